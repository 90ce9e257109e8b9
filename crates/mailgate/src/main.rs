//! The `mailgate` binary: the gateway (`serve`) and every admin command, all working on the same
//! store (`--data-dir` or `--config`), safely while a server runs on it.

// Standard output for every command. These shadow std's `println!` and `print!` in the whole
// crate (a `macro_rules!` defined before the modules is in scope in all of them), so no command
// can forget: a closed standard output (`mailgate captured list | head -1`) ends the command
// normally, exit 0 and no message, where std's macros panic (exit 101). ARCHITECTURE.md says
// why this rather than restoring SIGPIPE's default action.
macro_rules! println {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

mod api;
mod bundle;
mod config;
mod doctor;
mod explain;
mod files;
mod listen;
mod queue_api;
mod queue_cli;
mod relay_setup;
mod serve;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use mailgate_core::directory::{AbuseState, Directory, UserStatus};
use mailgate_store::{SqliteStore, Store};

use crate::config::{Config, LogFormat};

/// The demo organisation: also the documented example directory file.
const DEMO_ORG: &str = include_str!("../../../docs/examples/org.yaml");

#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "A self-hosted mail-sending gateway that never leaves a refusal unexplained."
)]
struct Cli {
    /// Configuration file (TOML, see docs/config.md).
    #[arg(long, global = true, env = "MAILGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory holding the embedded database (default ./mailgate-data).
    #[arg(long, global = true, env = "MAILGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        /// Development mode: embedded SQLite, the demo organisation, loopback listeners.
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
        req: Box<explain::ExplainRequest>,
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
    /// Tokens for the admin HTTP API.
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCmd),
    /// Write a .tar.gz for a support ticket: a decision's trace, the directory objects it
    /// touched, the effective configuration, the version, a doctor report; secrets removed
    /// (README.txt inside says what is in it). Without --decision: the recent refusals.
    SupportBundle(bundle::BundleArgs),
}

#[derive(Subcommand)]
enum UserCmd {
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
enum KeyCmd {
    /// Create an API key and print its secret once.
    Create(KeyCreate),
    /// One line per key (never the secret).
    List,
    /// Revoke a key by id.
    Revoke { id: String },
}

#[derive(Args)]
struct KeyCreate {
    /// The user the key sends as.
    #[arg(long)]
    owner: String,
    /// A name for people.
    #[arg(long)]
    name: String,
    /// Permission, repeatable (e.g. mail.send).
    #[arg(long = "permission")]
    permissions: Vec<String>,
    /// Allowed client range, repeatable (e.g. 10.0.0.0/8); none means any.
    #[arg(long = "allow-ip")]
    allow_ips: Vec<ipnet::IpNet>,
    /// Allowed HTTP referrer pattern, repeatable.
    #[arg(long = "allow-referrer")]
    allow_referrers: Vec<String>,
    /// Allowed API, repeatable (gmail.googleapis.com, sendgrid.api, smtp).
    #[arg(long = "allow-api")]
    allow_apis: Vec<String>,
    /// Project (for API enablement checks).
    #[arg(long)]
    project: Option<String>,
    /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
    #[arg(long)]
    expires: Option<String>,
}

#[derive(Subcommand)]
enum SaCmd {
    /// Service-account keys.
    #[command(subcommand)]
    Key(SaKeyCmd),
}

#[derive(Subcommand)]
enum SaKeyCmd {
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
enum AdminTokenCmd {
    /// Create (or replace) an admin API token and print it once.
    Create { name: String },
}

/// Writing to standard output, where a reader that went away is a normal end.
mod stdout {
    use std::io::Write;

    /// Writes to standard output (see `println!` above).
    pub(crate) fn write(args: std::fmt::Arguments<'_>) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_fmt(args) {
            closed(&e);
        }
    }

    /// Writes bytes as they are (`captured show --raw`).
    pub(crate) fn write_bytes(bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(bytes) {
            closed(&e);
        }
    }

    /// Flushes what is buffered (a last line without a newline).
    pub(crate) fn flush() {
        if let Err(e) = std::io::stdout().lock().flush() {
            closed(&e);
        }
    }

    /// The reader closed the pipe: the command ends normally (nothing more can be said, and
    /// the work asked for is done or not needed). Any other write error is one.
    fn closed(e: &std::io::Error) -> ! {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("mailgate: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// mimalloc: the send path allocates many small short-lived objects on two runtime threads and
/// the SQLite worker threads; glibc's allocator spent about a tenth of the CPU time there
/// (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Everything Mailgate creates (database, WAL, keys, credentials) is private to its owner.
    files::private_umask();
    let cli = Cli::parse();
    // `why` reads no configuration and opens no store: it works where nothing else is set up.
    if let Cmd::Why { text, json } = &cli.cmd {
        return match why(text, *json) {
            Ok(code) => {
                stdout::flush();
                code
            }
            Err(e) => {
                eprintln!("mailgate: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // Neither does `doctor`: it probes someone else's set-up.
    if let Cmd::Doctor(cmd) = cli.cmd {
        return match doctor::run(cmd) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("mailgate doctor: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.config.as_deref(), cli.data_dir.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // Admin commands speak on stdout/stderr themselves; only the server logs at info by default.
    let default_level = match cli.cmd {
        Cmd::Serve { .. } => config.log_level.clone(),
        _ => "warn".to_owned(),
    };
    init_logging(&config, &default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mailgate: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.cmd, config)) {
        Ok(code) => {
            stdout::flush();
            code
        }
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log timestamps in the one format Mailgate prints times in everywhere (CLI, admin API,
/// refusals): RFC 3339 UTC with milliseconds.
struct MillisUtc;

impl tracing_subscriber::fmt::time::FormatTime for MillisUtc {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        w.write_str(&mailgate_core::engine::rfc3339_ms(
            mailgate_gateway::now_ms(),
        ))
    }
}

fn init_logging(config: &Config, default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only on a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(MillisUtc)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Arc<SqliteStore>> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let path = config.database_path();
    files::secure_data_dir(&config.data_dir, &path);
    let store = SqliteStore::open(&path)
        .await
        .with_context(|| format!("cannot open the store {}", path.display()))?;
    Ok(Arc::new(store))
}

fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

async fn run(cmd: Cmd, config: Config) -> anyhow::Result<std::process::ExitCode> {
    let store = open_store(&config).await?;
    let actor = cli_actor();
    match cmd {
        Cmd::Serve { demo } => serve(config, store, demo).await?,
        Cmd::Apply {
            file,
            prune,
            dry_run,
        } => {
            let src = read_input(&file)?;
            match mailgate_admin::apply(store.as_ref(), &src, prune, dry_run, &actor).await {
                Ok(report) => {
                    for line in &report.changes {
                        println!("{line}");
                    }
                    let verb = if dry_run { "would change" } else { "changed" };
                    println!(
                        "{} object(s) {verb}; directory generation {}",
                        report.changes.len(),
                        report.generation
                    );
                }
                Err(mailgate_admin::ApplyError::Problems(problems)) => {
                    let name = if file == Path::new("-") {
                        "(stdin)".to_owned()
                    } else {
                        file.display().to_string()
                    };
                    eprintln!("{name}: {} problem(s); nothing was changed", problems.len());
                    for p in &problems {
                        eprintln!("  {}", p.in_file(&name));
                    }
                    return Ok(std::process::ExitCode::from(1));
                }
                Err(mailgate_admin::ApplyError::Other(e)) => return Err(e),
            }
        }
        Cmd::Explain { req, json } => {
            let gateway = mailgate_gateway::Gateway::open(store.clone()).await?;
            mailgate_admin::faults::load(&gateway, store.as_ref()).await?;
            match explain::explain(&gateway, &req).await? {
                Ok(d) => {
                    let hint = req.principal_hint();
                    if json {
                        let mut v = mailgate_gateway::decision_json(&d.decision, &d.id);
                        if let (Some(h), Some(o)) = (hint, v.as_object_mut()) {
                            o.insert("hint".into(), h.into());
                        }
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        print!("{}", explain::to_text(&d.decision, &d.id));
                        if let Some(h) = hint {
                            println!("\n{h}");
                        }
                    }
                    if !d.decision.accepted() {
                        return Ok(std::process::ExitCode::from(3));
                    }
                }
                Err(bad) => bail!("explain: {bad}"),
            }
        }
        Cmd::Why { text, json } => return why(&text, json),
        Cmd::Doctor(_) => bail!("doctor runs before the configuration is read"),
        Cmd::Export { output } => {
            let yaml = mailgate_admin::export(store.as_ref()).await?;
            match output {
                Some(p) => std::fs::write(&p, yaml)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => print!("{yaml}"),
            }
        }
        Cmd::User(u) => user_cmd(store.as_ref(), &actor, u).await?,
        Cmd::Key(k) => key_cmd(store.as_ref(), &actor, k).await?,
        Cmd::Sa(SaCmd::Key(SaKeyCmd::Create { email, output })) => {
            sa_key_create(store.as_ref(), &actor, &config, &email, &output).await?
        }
        Cmd::Queue(q) => return queue_cli::queue(store.as_ref(), q).await,
        Cmd::Captured(c) => return queue_cli::captured(store.as_ref(), c).await,
        Cmd::Simulate(a) => return queue_cli::simulate(store.as_ref(), &actor, a).await,
        Cmd::SupportBundle(a) => bundle::run(store.as_ref(), &config, &a).await?,
        Cmd::AdminToken(AdminTokenCmd::Create { name }) => {
            let token =
                mailgate_admin::directory::create_admin_token(store.as_ref(), &name).await?;
            println!("{token}");
            eprintln!("admin token `{name}` created; it is shown only now");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `mailgate why`: exit 0 when the text is understood, 3 when it is unknown.
fn why(text: &str, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let text = if text == "-" {
        read_input(Path::new("-"))?
    } else {
        text.to_owned()
    };
    let understood = !mailgate_core::why::why(&text).is_empty();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&mailgate_core::why::why_json(&text))?
        );
    } else {
        print!("{}", mailgate_core::why::why_text(&text));
    }
    Ok(std::process::ExitCode::from(if understood { 0 } else { 3 }))
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

async fn user_cmd(store: &dyn Store, actor: &str, cmd: UserCmd) -> anyhow::Result<()> {
    use mailgate_admin::directory as dir;
    match cmd {
        UserCmd::List => {
            let users = dir::users(store).await?;
            if users.is_empty() {
                queue_cli::empty(
                    "no user in the directory (add some with `mailgate apply -f org.yaml`)",
                );
            }
            for u in &users {
                let status = serde_json::to_value(u.status)?;
                let mut notes = Vec::new();
                if !u.mail_enabled {
                    notes.push("mail disabled".to_owned());
                }
                if u.abuse.state != AbuseState::Healthy {
                    let state = serde_json::to_value(u.abuse.state)?;
                    notes.push(format!("abuse: {}", state.as_str().unwrap_or("?")));
                }
                println!(
                    "{}\t{}\t{}\t{}",
                    u.email,
                    status.as_str().unwrap_or("?"),
                    u.org_unit,
                    notes.join(", ")
                );
            }
        }
        UserCmd::Show { email } => {
            let u = dir::user(store, &email)
                .await?
                .ok_or_else(|| anyhow!("no user `{email}` in the directory"))?;
            let mut d = Directory::default();
            d.users.push(u);
            print!("{}", mailgate_core::orgfile::to_yaml(&d));
        }
        UserCmd::Suspend { email } => {
            dir::set_user_status(store, actor, &email, UserStatus::Suspended).await?;
            println!("{email} suspended");
        }
        UserCmd::Unsuspend { email } | UserCmd::Approve { email } => {
            dir::set_user_status(store, actor, &email, UserStatus::Active).await?;
            println!("{email} active");
        }
        UserCmd::SetPassword { email } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let plain = line.trim_end_matches(['\r', '\n']);
            dir::set_password(store, actor, &email, plain).await?;
            println!("password of {email} set");
        }
        UserCmd::RevokeSending { email, evidence } => {
            dir::revoke_sending(store, actor, &email, &evidence).await?;
            println!("sending revoked for {email}");
        }
        UserCmd::RestoreSending { email } => {
            dir::restore_sending(store, actor, &email).await?;
            println!("sending restored for {email}");
        }
    }
    Ok(())
}

async fn key_cmd(store: &dyn Store, actor: &str, cmd: KeyCmd) -> anyhow::Result<()> {
    use mailgate_admin::directory as dir;
    match cmd {
        KeyCmd::Create(c) => {
            let new = dir::NewApiKey {
                owner: c.owner,
                name: c.name,
                permissions: c.permissions,
                allowed_ips: c.allow_ips,
                allowed_referrers: c.allow_referrers,
                allowed_apis: c.allow_apis,
                project: c.project,
                expires: c.expires,
            };
            let key = dir::create_api_key(store, actor, new).await?;
            println!("{}", key.secret);
            eprintln!(
                "API key {} created; the secret above is shown only now",
                key.id
            );
        }
        KeyCmd::List => {
            let keys = dir::api_keys(store).await?;
            if keys.is_empty() {
                queue_cli::empty("no API key (create one with `mailgate key create`)");
            }
            for k in &keys {
                println!(
                    "{}\t{}\t{}\t[{}]{}",
                    k.id,
                    k.name,
                    k.owner,
                    k.permissions.join(","),
                    if k.revoked { "\trevoked" } else { "" }
                );
            }
        }
        KeyCmd::Revoke { id } => {
            dir::revoke_api_key(store, actor, &id).await?;
            println!("API key {id} revoked");
        }
    }
    Ok(())
}

async fn sa_key_create(
    store: &dyn Store,
    actor: &str,
    config: &Config,
    email: &str,
    output: &Path,
) -> anyhow::Result<()> {
    let base = &config.public_url;
    let key =
        mailgate_admin::directory::create_service_account_key(store, actor, email, base).await?;
    write_private(output, key.key_file.as_bytes())?;
    println!(
        "key {} of {email} written to {} (token_uri {base}/token)",
        key.id,
        output.display()
    );
    Ok(())
}

/// Writes a file only its owner can read (see `files::write_private`).
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    files::write_private(path, data)
}

async fn serve(config: Config, store: Arc<SqliteStore>, demo: bool) -> anyhow::Result<()> {
    let mut credentials_file = None;
    if demo {
        if store.generation().await? == 0 {
            let report = mailgate_admin::apply(store.as_ref(), DEMO_ORG, false, false, "demo")
                .await
                .map_err(|e| match e {
                    mailgate_admin::ApplyError::Problems(p) => anyhow!(
                        "the embedded demo organisation is invalid: {}",
                        p.iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    mailgate_admin::ApplyError::Other(e) => e,
                })?;
            tracing::info!(objects = report.changes.len(), "demo organisation applied");
        } else {
            tracing::info!(
                "data directory already holds a directory; demo organisation not re-applied"
            );
        }
        let token = mailgate_admin::directory::create_admin_token(store.as_ref(), "demo").await?;
        let path = config.data_dir.join("demo-credentials.txt");
        write_private(&path, demo_credentials(&token).as_bytes())?;
        credentials_file = Some(path);
    }
    let tls = tls_material(&config, demo)?;
    let tokens: Arc<dyn mailgate_store::TokenStore> = store.clone();
    let smtp_tokens = tokens.clone();
    let queue: Arc<dyn mailgate_store::QueueStore> = store.clone();
    let limits = files::fit_open_files(&config.limits);
    let gateway = mailgate_gateway::Gateway::open_with_limits(store, limits).await?;
    gateway.lockout().set_policy(config.lockout);
    let _relay = relay_setup::spawn(&config.relay, demo, &gateway, queue.clone())?;
    let mut token_urls = vec![format!("{}/token", config.public_url)];
    if tls.is_some() {
        token_urls.push(format!("https://{}/token", config.https_listen));
        token_urls.push(format!(
            "https://localhost:{}/token",
            config.https_listen.port()
        ));
    }
    let gmail = Arc::new(mailgate_gmail::GmailState::new(
        gateway.clone(),
        tokens,
        token_urls,
    ));
    let state = std::sync::Arc::new(api::AppState {
        gateway,
        queue,
        data_dir: Some(config.data_dir.clone()),
    });
    let cfg = config.clone();
    let smtp = Arc::new(mailgate_smtp::SmtpContext {
        gateway: state.gateway.clone(),
        tokens: smtp_tokens,
        hostname: "mailgate".to_owned(),
        limits: config.smtp_limits,
        auth_without_tls: false,
    });
    serve::run(&config, state, gmail, tls, smtp, move |bound| {
        print_banner(&cfg, &bound, demo, credentials_file.as_deref());
    })
    .await
}

/// The HTTPS certificate and key: the configured files, or in demo mode a self-signed pair kept
/// under the data directory (generated once).
fn tls_material(config: &Config, demo: bool) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let c = std::fs::read(cert)
            .with_context(|| format!("cannot read https.cert {}", cert.display()))?;
        let k = std::fs::read(key)
            .with_context(|| format!("cannot read https.key {}", key.display()))?;
        return Ok(Some((c, k)));
    }
    if !demo {
        return Ok(None);
    }
    let dir = config.data_dir.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(&dir)?;
        let (c, k) = mailgate_tls::self_signed(&["localhost", "127.0.0.1"])?;
        std::fs::write(&cert, c)?;
        write_private(&key, k.as_bytes())?;
    }
    Ok(Some((std::fs::read(&cert)?, std::fs::read(&key)?)))
}

fn demo_credentials(admin_token: &str) -> String {
    // The demo passwords and keys are the ones in docs/examples/org.yaml: public, for trying out.
    // Each secret is named as the client library calls it (`api_key`, `client_secret`).
    let mut out = String::from(
        "# Mailgate demo credentials (development only: these come from docs/examples/org.yaml)\n",
    );
    out.push_str(&format!("admin_token = {admin_token}\n"));
    out.push_str("# users (password for every demo user): correct horse battery staple\n");
    let dir = match mailgate_core::orgfile::OrgFile::parse(DEMO_ORG) {
        Ok(f) => f.directory,
        Err(_) => return out,
    };
    for k in &dir.api_keys {
        if let Some(secret) = &k.secret {
            out.push_str(&format!(
                "# API key `{}` of {} (SendGrid door: Authorization: Bearer; SMTP: user apikey)\n",
                k.name, k.owner
            ));
            out.push_str(&format!("api_key = {}\n", secret.expose()));
        }
    }
    for c in &dir.oauth_clients {
        if let Some(secret) = &c.secret {
            out.push_str(&format!(
                "# OAuth client `{}` (authorization-code flow, redirect {})\n",
                c.name.as_deref().unwrap_or(&c.client_id),
                c.redirect_uris.join(", ")
            ));
            out.push_str(&format!("client_id = {}\n", c.client_id));
            out.push_str(&format!("client_secret = {}\n", secret.expose()));
        }
    }
    out
}

fn print_banner(config: &Config, bound: &serve::Bound, demo: bool, credentials: Option<&Path>) {
    use std::fmt::Write as _;
    // Written in one piece, and a closed standard output does not stop the server.
    let mut b = String::new();
    let http = bound.http;
    let mode = if demo { " (demo mode)" } else { "" };
    let _ = writeln!(b, "Mailgate {}{mode}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        b,
        "  store               SQLite {}",
        config.database_path().display()
    );
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
        let _ = writeln!(
            b,
            "  try                 mailgate --data-dir {} user list",
            config.data_dir.display()
        );
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
