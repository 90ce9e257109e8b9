//! The directory verbs on the command line (`apply`, `export`, `user`, `key`, `sa key create`,
//! `admin-token create`): `mailgate_admin::directory` does them, this says what was done.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use mailgate_core::directory::{AbuseState, Directory, UserStatus};
use mailgate_store::Store;

use crate::cli::{KeyCmd, UserCmd};
use crate::config::Config;
use crate::{files, queue_cli};

/// `mailgate apply`: exit 1 when the file has problems (each printed with its line).
pub(crate) async fn apply(
    store: &dyn Store,
    actor: &str,
    file: &Path,
    prune: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let src = files::read_input(file)?;
    match mailgate_admin::apply(store, &src, prune, dry_run, actor).await {
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
            return Ok(ExitCode::from(1));
        }
        Err(mailgate_admin::ApplyError::Other(e)) => return Err(e),
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailgate export`: to a file or standard output.
pub(crate) async fn export(store: &dyn Store, output: Option<&Path>) -> anyhow::Result<()> {
    let yaml = mailgate_admin::export(store).await?;
    match output {
        Some(p) => {
            std::fs::write(p, yaml).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => print!("{yaml}"),
    }
    Ok(())
}

/// `mailgate admin-token create`: the token on standard output, shown only now.
pub(crate) async fn admin_token_create(store: &dyn Store, name: &str) -> anyhow::Result<()> {
    let token = mailgate_admin::directory::create_admin_token(store, name).await?;
    println!("{token}");
    eprintln!("admin token `{name}` created; it is shown only now");
    Ok(())
}

/// `mailgate audit`: the directory's audit log, newest first (tab-separated, or JSON).
pub(crate) async fn audit(store: &dyn Store, limit: u32, json: bool) -> anyhow::Result<()> {
    let lines = mailgate_admin::directory::audit(store, limit).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "changes": lines }))?
        );
        return Ok(());
    }
    if lines.is_empty() {
        queue_cli::empty("no directory change recorded (`mailgate apply -f org.yaml` makes some)");
    }
    for l in &lines {
        println!(
            "{}\tgeneration {}\t{}\t{}\t{}\t{}",
            l.at, l.generation, l.actor, l.action, l.kind, l.id
        );
    }
    Ok(())
}

pub(crate) async fn user_cmd(store: &dyn Store, actor: &str, cmd: UserCmd) -> anyhow::Result<()> {
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

pub(crate) async fn key_cmd(store: &dyn Store, actor: &str, cmd: KeyCmd) -> anyhow::Result<()> {
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

pub(crate) async fn sa_key_create(
    store: &dyn Store,
    actor: &str,
    config: &Config,
    email: &str,
    output: &Path,
) -> anyhow::Result<()> {
    let base = &config.public_url;
    let key =
        mailgate_admin::directory::create_service_account_key(store, actor, email, base).await?;
    files::write_private(output, key.key_file.as_bytes())?;
    println!(
        "key {} of {email} written to {} (token_uri {base}/token)",
        key.id,
        output.display()
    );
    Ok(())
}
