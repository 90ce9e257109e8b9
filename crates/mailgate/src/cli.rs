//! The command line: every verb and its arguments (clap). What each does is in the module that
//! runs it; the verbs' work is in `mailgate_admin`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{bundle, doctor, queue_cli};

/// The command line.
#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "A self-hosted mail-sending gateway that never leaves a refusal unexplained."
)]
pub(crate) struct Cli {
    /// Configuration file (TOML, see docs/config.md).
    #[arg(long, global = true, env = "MAILGATE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Data directory holding the embedded database (default ./mailgate-data).
    #[arg(long, global = true, env = "MAILGATE_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// The store: postgres://USER[:PASSWORD]@HOST:PORT/DB (PostgreSQL, for several nodes) or
    /// sqlite://PATH; over `[store] url` in the config file. Default: SQLite in the data
    /// directory.
    #[arg(long, global = true, env = "MAILGATE_DATABASE_URL", value_name = "URL")]
    pub(crate) database_url: Option<String>,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run the gateway.
    Serve {
        /// Development mode: the demo organisation, loopback listeners (on the embedded SQLite
        /// unless a store URL is given).
        #[arg(long)]
        demo: bool,
    },
    /// Create or update everything a directory file names, in one transaction.
    Apply {
        /// The directory file (YAML); `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Also remove what the file no longer names.
        #[arg(long)]
        prune: bool,
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Dry-run a send against the live directory and counters: every check, every remedy.
    ///
    /// A check whose fact was not given (--ip, --referrer) is shown `?` "not checked": it
    /// neither passes nor fails, and the verdict says so.
    ///
    /// Exit status: 0 allowed (or accepted and held), 3 denied, 1 error.
    Explain {
        #[command(flatten)]
        req: Box<mailgate_admin::explain::ExplainRequest>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What an error message means: paste one (or a whole error body) from Google's Gmail API
    /// or token endpoint, SendGrid, an SMTP server or Mailgate, and get its causes, most likely
    /// first, each with how to confirm it, the remedy and the reason code (docs/why.md).
    ///
    /// Needs no server and no store. Exit status: 0 understood, 3 unknown (the questions that
    /// narrow it down are printed), 1 error.
    Why {
        /// The error text; `-` reads standard input.
        text: String,
        /// Machine-readable output (the same JSON as `POST /mailgate/v1/why`).
        #[arg(long)]
        json: bool,
    },
    /// Diagnose a real set-up step by step: Google's Gmail API (service account or user
    /// consent), SendGrid, an SMTP server, or a Mailgate speaking any of them (docs/doctor.md).
    ///
    /// Needs no server and no store. Every problem found is named with its reason code and
    /// remedy; secrets are never printed. Exit status: 0 all good, 3 problems found, 1 could
    /// not run.
    #[command(subcommand)]
    Doctor(doctor::DoctorCmd),
    /// Print the directory in the directory-file format (secrets only as hashes).
    Export {
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Users: list, show, suspend, approve, ...
    #[command(subcommand)]
    User(UserCmd),
    /// API keys: create, list, revoke.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Service accounts.
    #[command(subcommand)]
    Sa(SaCmd),
    /// The delivery queue: list, show, retry, delete.
    #[command(subcommand)]
    Queue(queue_cli::QueueCmd),
    /// Mail kept by capture mode: list, show.
    #[command(subcommand)]
    Captured(queue_cli::CapturedCmd),
    /// Make a principal's next sends fail with a reason code, to test error handling (injected
    /// faults are marked as such in every trace).
    Simulate(queue_cli::SimulateArgs),
    /// Who changed what in the directory, newest first: one line per object changed (time,
    /// generation, actor, create/update/delete, section, id). Never a secret.
    Audit {
        /// At most this many lines.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Machine-readable output (the same JSON as `GET /mailgate/v1/audit`).
        #[arg(long)]
        json: bool,
    },
    /// The nodes serving from this store: one line per node (id, live or not, how long ago its
    /// last heartbeat was, the delivery leases it holds, its directory generation, host and
    /// pid). A node is live while it wrote its heartbeat within three intervals (2 s each) plus
    /// its directory poll interval; one that died holding leases is listed until they expire.
    Status {
        /// Machine-readable output (the same JSON as `GET /mailgate/v1/status`).
        #[arg(long)]
        json: bool,
    },
    /// Tokens for the admin HTTP API.
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCmd),
    /// Write a .tar.gz for a support ticket: a decision's trace, the directory objects it
    /// touched, the effective configuration, the version, a doctor report; secrets removed
    /// (README.txt inside says what is in it). Without --decision: the recent refusals.
    SupportBundle(bundle::BundleArgs),
}

#[derive(Subcommand)]
pub(crate) enum UserCmd {
    /// One line per user: address, status, org unit.
    List,
    /// Everything about one user (no password hash).
    Show { email: String },
    /// Suspend a user: every send is refused with `account.suspended`.
    Suspend { email: String },
    /// Lift a suspension.
    Unsuspend { email: String },
    /// Approve an account under review so it may send.
    Approve { email: String },
    /// Set a password, read from standard input (one line).
    SetPassword { email: String },
    /// Revoke sending after abuse or compromise (`account.sending_revoked`).
    RevokeSending {
        email: String,
        /// What was seen (shown in refusals and explain).
        #[arg(long)]
        evidence: String,
    },
    /// Restore sending after a revocation.
    RestoreSending { email: String },
}

#[derive(Subcommand)]
pub(crate) enum KeyCmd {
    /// Create an API key and print its secret once.
    Create(KeyCreate),
    /// One line per key (never the secret).
    List,
    /// Revoke a key by id.
    Revoke {
        /// The key id (the middle part of `SG.<id>.<secret>`; may begin with `-`).
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Args)]
pub(crate) struct KeyCreate {
    /// The user the key sends as.
    #[arg(long)]
    pub(crate) owner: String,
    /// A name for people.
    #[arg(long)]
    pub(crate) name: String,
    /// Permission, repeatable (e.g. mail.send).
    #[arg(long = "permission")]
    pub(crate) permissions: Vec<String>,
    /// Allowed client range, repeatable (e.g. 10.0.0.0/8); none means any.
    #[arg(long = "allow-ip")]
    pub(crate) allow_ips: Vec<ipnet::IpNet>,
    /// Allowed HTTP referrer pattern, repeatable.
    #[arg(long = "allow-referrer")]
    pub(crate) allow_referrers: Vec<String>,
    /// Allowed API, repeatable (gmail.googleapis.com, sendgrid.api, smtp).
    #[arg(long = "allow-api")]
    pub(crate) allow_apis: Vec<String>,
    /// Project (for API enablement checks).
    #[arg(long)]
    pub(crate) project: Option<String>,
    /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
    #[arg(long)]
    pub(crate) expires: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum SaCmd {
    /// Service-account keys.
    #[command(subcommand)]
    Key(SaKeyCmd),
}

#[derive(Subcommand)]
pub(crate) enum SaKeyCmd {
    /// Create a key and write a Google-format JSON key file whose token_uri points here.
    Create {
        /// Service account address.
        email: String,
        /// Where to write the key file (mode 0600).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum AdminTokenCmd {
    /// Create (or replace) an admin API token and print it once.
    Create { name: String },
}
