//! `mailgate serve`: opens the gateway on the store, applies the demo organisation in demo mode,
//! finds the TLS material, starts the delivery workers and the doors, and prints the banner.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use mailgate_store::Stores;

use crate::config::Config;
use crate::{api, banner, demo, files, node, relay_setup, serve};

/// Runs the gateway until SIGINT/SIGTERM.
pub(crate) async fn serve(config: Config, stores: Stores, demo: bool) -> anyhow::Result<()> {
    let Stores {
        directory: store,
        queue,
        tokens,
    } = stores;
    let mut credentials_file = None;
    if demo {
        if store.generation().await? == 0 {
            let report =
                mailgate_admin::apply(store.as_ref(), demo::DEMO_ORG, false, false, "demo")
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
            tracing::info!("the store already holds a directory; demo organisation not re-applied");
        }
        let token = mailgate_admin::directory::create_admin_token(store.as_ref(), "demo").await?;
        let path = config.data_dir.join("demo-credentials.txt");
        files::write_private(&path, demo::demo_credentials(&token).as_bytes())?;
        credentials_file = Some(path);
    }
    let tls = tls_material(&config, demo)?;
    // Access tokens looked up once a second, not per send (ARCHITECTURE.md, "Access-token cache").
    let tokens: Arc<dyn mailgate_store::TokenStore> =
        Arc::new(mailgate_store::CachedTokens::new(tokens));
    let smtp_tokens = tokens.clone();
    let limits = files::fit_open_files(&config.limits);
    // Failed-AUTH counts shared by every node on this store (docs/security.md: at most what the
    // password pool can check, 50 a second per argon2 slot, written per node).
    let shared_lockout: Arc<dyn mailgate_store::LockoutStore> = store.clone();
    let lockout_writes =
        u32::try_from(limits.password_concurrency.saturating_mul(50)).unwrap_or(u32::MAX);
    let gateway = mailgate_gateway::Gateway::open_with_limits(store, limits).await?;
    gateway.lockout().set_policy(config.lockout);
    // One node per SQLite file: its own table is exact there.
    if shared_lockout.counts_for_several_nodes() {
        gateway.lockout().share(shared_lockout, lockout_writes);
    }
    // This node's identity, and the leases its earlier run left, before any worker leases.
    let node = node::node_id(config.node_id.as_deref(), &config.data_dir)?;
    tracing::info!(node = %node, "node identity");
    relay_setup::take_back_leases(queue.as_ref(), &node).await?;
    // Likewise the concurrent-send slots its earlier run held (shared counters only); and its
    // message-id node number, so no two running nodes make the same message id.
    let freed = gateway.join_as(&node).await?;
    tracing::info!(node = %node, number = gateway.node_number(), "message-id node number");
    if freed > 0 {
        tracing::info!(node = %node, slots = freed, "freed the concurrent-send slots this node held when it last stopped");
    }
    let _relay = relay_setup::spawn(&config.relay, demo, &gateway, queue.clone(), &node)?;
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
        // Free space is health for a file store only: the SQLite file's directory.
        data_dir: config
            .store()
            .sqlite_file()
            .map(|file| match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => std::path::PathBuf::from("."),
            }),
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
        banner::print_banner(&cfg, &bound, demo, credentials_file.as_deref());
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
        files::write_private(&key, k.as_bytes())?;
    }
    Ok(Some((std::fs::read(&cert)?, std::fs::read(&key)?)))
}
