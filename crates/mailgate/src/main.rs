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

mod admin_api;
mod api;
mod banner;
mod bundle;
mod cli;
mod config;
mod demo;
mod directory_cli;
mod doctor;
mod explain;
mod files;
mod listen;
mod logging;
mod node;
mod queue_api;
mod queue_cli;
mod relay_setup;
mod serve;
mod start;
mod status_cli;
mod stdout;

use std::path::Path;

use anyhow::{Context, bail};
use clap::Parser;
use mailgate_store::Stores;

use crate::cli::{AdminTokenCmd, Cli, Cmd, SaCmd, SaKeyCmd};
use crate::config::{Config, StoreLocation};
use crate::logging::init_logging;

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
    let config = match Config::load(
        cli.config.as_deref(),
        cli.data_dir.as_deref(),
        cli.database_url.as_deref(),
    ) {
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

async fn open_store(config: &Config) -> anyhow::Result<Stores> {
    // The data directory also holds what is not in the store (demo credentials, the demo
    // certificate), whichever the store is.
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let location = config.store();
    files::secure_data_dir(&config.data_dir, location.sqlite_file());
    let opened = match &location {
        StoreLocation::Sqlite(path) => mailgate_store::open_path(path).await,
        StoreLocation::Postgres(url) => mailgate_store::open(url).await,
    };
    opened.map_err(|e| {
        // A schema too new says so itself (StoreError::SchemaTooNew's message).
        let shown = location.shown();
        if location.sqlite_file().is_none() && e.is_temporary() {
            return anyhow::Error::new(e).context(format!(
                "cannot open the store {shown}: check that PostgreSQL runs at that host and \
                 port and accepts connections there, that the user may log in (password, \
                 pg_hba.conf) and that the database exists (createdb); the URL comes from \
                 --database-url, MAILGATE_DATABASE_URL or [store] url"
            ));
        }
        anyhow::Error::new(e).context(format!("cannot open the store {shown}"))
    })
}

fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

async fn run(cmd: Cmd, config: Config) -> anyhow::Result<std::process::ExitCode> {
    let stores = open_store(&config).await?;
    let store = stores.directory.clone();
    let actor = cli_actor();
    match cmd {
        Cmd::Serve { demo } => start::serve(config, stores, demo).await?,
        Cmd::Apply {
            file,
            prune,
            dry_run,
        } => return directory_cli::apply(store.as_ref(), &actor, &file, prune, dry_run).await,
        Cmd::Explain { req, json } => return explain::cli(store, &req, json).await,
        Cmd::Why { text, json } => return why(&text, json),
        Cmd::Doctor(_) => bail!("doctor runs before the configuration is read"),
        Cmd::Export { output } => directory_cli::export(store.as_ref(), output.as_deref()).await?,
        Cmd::User(u) => directory_cli::user_cmd(store.as_ref(), &actor, u).await?,
        Cmd::Key(k) => directory_cli::key_cmd(store.as_ref(), &actor, k).await?,
        Cmd::Sa(SaCmd::Key(SaKeyCmd::Create { email, output })) => {
            directory_cli::sa_key_create(store.as_ref(), &actor, &config, &email, &output).await?
        }
        Cmd::Queue(q) => return queue_cli::queue(stores.queue.as_ref(), q).await,
        Cmd::Captured(c) => return queue_cli::captured(stores.queue.as_ref(), c).await,
        Cmd::Simulate(a) => return queue_cli::simulate(store.as_ref(), &actor, a).await,
        Cmd::SupportBundle(a) => bundle::run(store.as_ref(), &config, &a).await?,
        Cmd::Audit { limit, json } => directory_cli::audit(store.as_ref(), limit, json).await?,
        Cmd::Status { json } => {
            status_cli::status(store.as_ref(), stores.queue.as_ref(), json).await?
        }
        Cmd::AdminToken(AdminTokenCmd::Create { name }) => {
            directory_cli::admin_token_create(store.as_ref(), &name).await?
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `mailgate why`: exit 0 when the text is understood, 3 when it is unknown.
fn why(text: &str, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let text = if text == "-" {
        files::read_input(Path::new("-"))?
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
