//! `mailgate support-bundle`: the arguments, the effective configuration as JSON, and writing
//! the file; the bundle itself is made by `mailgate_admin::bundle` (docs/doctor.md, "Support
//! bundle").

use std::path::PathBuf;

use clap::Args;
use mailgate_admin::bundle::word;
use mailgate_core::directory::Directory;
use mailgate_store::Store;
use serde_json::{Value, json};

use crate::config::Config;

/// What a removed secret field says instead.
const REMOVED: &str = "(removed)";

/// `mailgate support-bundle` arguments.
#[derive(Debug, Args)]
pub(crate) struct BundleArgs {
    /// The decision to include (from a refusal: the `X-Mailgate-Decision` header, the
    /// `Decision:` at the end of its explanation, or `decision_id` in JSON). Without it, the
    /// bundle lists the most recent refusals to pick one from.
    #[arg(long, value_name = "ID")]
    decision: Option<String>,
    /// A `mailgate doctor ... --json` report to include (its secrets are removed again on the
    /// way in).
    #[arg(long = "doctor-json", value_name = "FILE")]
    doctor_json: Option<PathBuf>,
    /// Where to write the bundle (`.tar.gz`, readable by its owner only).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
}

/// Makes the bundle and writes it to `args.output` (mode 0600).
pub(crate) async fn run(
    store: &dyn Store,
    config: &Config,
    args: &BundleArgs,
) -> anyhow::Result<()> {
    let dir = store.snapshot().await?.directory;
    let database = config.store().shown();
    let ctx = mailgate_admin::bundle::Context {
        config: effective_config(config, &dir),
        data_dir: &config.data_dir,
        database: &database,
        retention_decisions_days: config.retention_decisions_days,
    };
    let req = mailgate_admin::bundle::Request {
        decision: args.decision.as_deref(),
        doctor_json: args.doctor_json.as_deref(),
    };
    let bundle =
        mailgate_admin::bundle::make(store, &ctx, &req, mailgate_gateway::now_ms()).await?;
    crate::files::write_private(&args.output, &bundle.archive)?;
    println!(
        "support bundle written to {} ({} files; README.txt inside says what is in it and what was removed)",
        args.output.display(),
        bundle.files
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The effective configuration.

fn effective_config(c: &Config, dir: &Directory) -> Value {
    let secs = |d: std::time::Duration| d.as_secs();
    let relay = match (
        crate::relay_setup::relay_config(&c.relay, false),
        crate::relay_setup::relay_config(&c.relay, true),
    ) {
        (Ok(r), Ok(demo)) => json!({
            "capture": if r.capture == demo.capture {
                json!(r.capture)
            } else {
                json!("not set: on with `serve --demo`, off otherwise (and always on when the directory has no smarthost)")
            },
            "max_age_secs": secs(r.max_age),
            "retry_initial_ms": r.retry_initial.as_millis() as u64,
            "retry_max_ms": r.retry_max.as_millis() as u64,
            "lease_ms": r.lease.as_millis() as u64,
            "poll_interval_ms": r.poll_interval.as_millis() as u64,
            "timeout_secs": secs(r.timeout),
            "helo_name": r.helo_name,
            "ca_file": r.ca_pem.as_ref().map(|p| format!("set ({} bytes of PEM)", p.len())),
            "xoauth2_smarthosts": r.xoauth2_smarthosts,
        }),
        (Err(e), _) | (_, Err(e)) => json!({ "error": format!("{e:#}") }),
    };
    let l = &c.limits;
    let smtp = &c.smtp_limits;
    let store = c.store();
    json!({
        "data_dir": c.data_dir,
        // The URL never with its password.
        "store": {
            "backend": match store {
                crate::config::StoreLocation::Sqlite(_) => "sqlite",
                crate::config::StoreLocation::Postgres(_) => "postgresql",
            },
            "url": store.shown(),
        },
        "http": { "listen": c.http_listen.to_string(), "public_url": c.public_url },
        "https": {
            "listen": c.https_listen.to_string(),
            "cert": c.tls_cert,
            "key": c.tls_key,
        },
        "smtp": {
            "submission_listen": c.smtp_submission_listen.to_string(),
            "smtps_listen": c.smtps_listen.to_string(),
            "relay_listen": c.smtp_relay_listen.to_string(),
            "bare_newline": match smtp.bare_newline {
                mailgate_smtp::BareNewline::Reject => "reject",
                mailgate_smtp::BareNewline::Normalize => "normalize",
            },
        },
        "directory": { "reload_interval_ms": c.reload_interval_ms },
        "log": {
            "format": match c.log_format {
                crate::config::LogFormat::Text => "text",
                crate::config::LogFormat::Json => "json",
            },
            "level": c.log_level,
            "destination": "standard error (no log file)",
        },
        "relay": relay,
        "retention": {
            "decisions_days": c.retention_decisions_days,
            "messages_days": c.retention_messages_days,
        },
        "limits": {
            "http_max_connections": l.http_max_connections,
            "http_max_connections_per_ip": l.http_max_connections_per_ip,
            "smtp_max_connections": l.smtp_max_connections,
            "smtp_max_connections_per_ip": l.smtp_max_connections_per_ip,
            "header_timeout_secs": secs(l.header_timeout),
            "http_idle_timeout_secs": secs(l.http_idle_timeout),
            "data_memory_mb": l.data_memory_bytes / (1024 * 1024),
            "password_concurrency": l.password_concurrency,
            "password_queue": l.password_queue,
            "refusal_log_per_second": l.refusal_log_per_second,
            "unauthenticated_decisions_kept": l.unauthenticated_decisions_kept,
            "lockout_login_failures": c.lockout.login_threshold,
            "lockout_network_failures": c.lockout.network_threshold,
            "lockout_max_secs": secs(c.lockout.max_lock),
            "smtp_soft_error_limit": smtp.soft_error_limit,
            "smtp_hard_error_limit": smtp.hard_error_limit,
            "smtp_commands_without_mail": smtp.max_commands_without_mail,
            "smtp_idle_secs": secs(smtp.idle),
            "smtp_idle_untrusted_secs": secs(smtp.idle_untrusted),
            "smtp_untrusted_lifetime_secs": secs(smtp.untrusted_lifetime),
        },
        // From the directory, where smarthosts live: where each password comes from, never
        // the password.
        "smarthosts": dir.smarthosts.iter().map(|h| json!({
            "name": h.name,
            "host": h.host,
            "port": h.port,
            "tls": word(h.tls),
            "domains": h.domains,
            "username": h.username,
            "password_ref": h.password_ref.as_deref().map(password_ref_shown),
        })).collect::<Vec<_>>(),
    })
}

/// A smarthost's `password_ref` as shown: `env:VAR` and `file:/path` say where the password is
/// (validation allows nothing else); anything else is removed.
fn password_ref_shown(r: &str) -> String {
    if r.starts_with("env:") || r.starts_with("file:") {
        r.to_owned()
    } else {
        REMOVED.to_owned()
    }
}
