//! The configuration file (`mailgate.toml`), in two stages as ripgrep does: [`RawConfig`] is what
//! the file says (every key optional, unknown keys refused), [`Config`] is resolved and validated.
//! Every key and its default is documented in `docs/config.md`; a test keeps the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./mailgate-data";

/// What the file may contain.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    node: crate::node::RawNode,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    https: RawHttps,
    #[serde(default)]
    smtp: RawSmtp,
    #[serde(default)]
    directory: RawDirectory,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    relay: crate::relay_setup::RawRelay,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    store: RawStore,
}

/// `[store]`: where the store is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
}

/// Where the store is: `--database-url` (or `MAILGATE_DATABASE_URL`), else `[store] url`, else
/// the SQLite file `mailgate.db` under the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite database file (the default, or `sqlite://PATH`, or a file path).
    Sqlite(PathBuf),
    /// A PostgreSQL database: the URL as given, its password included (show it with
    /// [`StoreLocation::shown`], never directly).
    Postgres(String),
}

impl StoreLocation {
    /// Reads a store URL: `postgres://` or `postgresql://` (PostgreSQL), `sqlite://PATH` or
    /// `sqlite:PATH` or a plain file path (SQLite). Any other scheme is refused, naming the ones
    /// there are (and the URL only without its password).
    pub fn parse(url: &str) -> anyhow::Result<StoreLocation> {
        let url = url.trim();
        if url.is_empty() {
            bail!("the store URL is empty: give postgres://USER@HOST:PORT/DB or sqlite://PATH");
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(url.to_owned()));
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                bail!("the store URL `{url}` names no file: give sqlite://PATH");
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            bail!(
                "the store URL `{}` has the scheme `{scheme}`, which is no store Mailgate has: \
                 give postgres://USER@HOST:PORT/DB (PostgreSQL) or sqlite://PATH (the embedded SQLite)",
                mailgate_store::postgres::redact(url)
            );
        }
        Ok(StoreLocation::Sqlite(PathBuf::from(url)))
    }

    /// What messages may show of it: the file's path, or the URL with its password as `***`.
    pub fn shown(&self) -> String {
        match self {
            StoreLocation::Sqlite(path) => path.display().to_string(),
            StoreLocation::Postgres(url) => mailgate_store::postgres::redact(url),
        }
    }

    /// The SQLite database file, when the store is one.
    pub fn sqlite_file(&self) -> Option<&Path> {
        match self {
            StoreLocation::Sqlite(path) => Some(path),
            StoreLocation::Postgres(_) => None,
        }
    }
}

/// `[limits]`: the resource budgets (docs/security.md). Every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    http_max_connections: Option<usize>,
    http_max_connections_per_ip: Option<usize>,
    smtp_max_connections: Option<usize>,
    smtp_max_connections_per_ip: Option<usize>,
    header_timeout_secs: Option<u64>,
    http_idle_timeout_secs: Option<u64>,
    data_memory_mb: Option<usize>,
    password_concurrency: Option<usize>,
    password_queue: Option<usize>,
    refusal_log_per_second: Option<u32>,
    unauthenticated_decisions_kept: Option<usize>,
    lockout_login_failures: Option<u32>,
    lockout_network_failures: Option<u32>,
    lockout_max_secs: Option<u64>,
    smtp_soft_error_limit: Option<u32>,
    smtp_hard_error_limit: Option<u32>,
    smtp_commands_without_mail: Option<u32>,
    smtp_idle_secs: Option<u64>,
    smtp_idle_untrusted_secs: Option<u64>,
    smtp_untrusted_lifetime_secs: Option<u64>,
}

impl RawLimits {
    /// The SMTP session limits (`limits.smtp_*`).
    fn smtp(&self) -> anyhow::Result<mailgate_smtp::Limits> {
        use std::time::Duration;
        let mut l = mailgate_smtp::Limits::default();
        let at_least_one = |key: &str, v: Option<u64>| -> anyhow::Result<Option<u64>> {
            match v {
                Some(0) => bail!("limits.{key} must be at least 1"),
                v => Ok(v),
            }
        };
        if let Some(n) = at_least_one(
            "smtp_soft_error_limit",
            self.smtp_soft_error_limit.map(u64::from),
        )? {
            l.soft_error_limit = n as u32;
        }
        if let Some(n) = at_least_one(
            "smtp_hard_error_limit",
            self.smtp_hard_error_limit.map(u64::from),
        )? {
            l.hard_error_limit = n as u32;
        }
        if l.soft_error_limit > l.hard_error_limit {
            bail!("limits.smtp_soft_error_limit must not be above limits.smtp_hard_error_limit");
        }
        if let Some(n) = at_least_one(
            "smtp_commands_without_mail",
            self.smtp_commands_without_mail.map(u64::from),
        )? {
            l.max_commands_without_mail = n as u32;
        }
        if let Some(s) = at_least_one("smtp_idle_secs", self.smtp_idle_secs)? {
            l.idle = Duration::from_secs(s);
        }
        if let Some(s) = at_least_one("smtp_idle_untrusted_secs", self.smtp_idle_untrusted_secs)? {
            l.idle_untrusted = Duration::from_secs(s);
            l.idle_under_pressure = l.idle_under_pressure.min(l.idle_untrusted);
        }
        if let Some(s) = at_least_one(
            "smtp_untrusted_lifetime_secs",
            self.smtp_untrusted_lifetime_secs,
        )? {
            l.untrusted_lifetime = Duration::from_secs(s);
        }
        Ok(l)
    }

    /// The failed-AUTH back-off (`limits.lockout_*`).
    fn lockout(&self) -> anyhow::Result<mailgate_gateway::lockout::LockoutPolicy> {
        let mut p = mailgate_gateway::lockout::LockoutPolicy::default();
        if let Some(n) = self.lockout_login_failures {
            if n == 0 {
                bail!("limits.lockout_login_failures must be at least 1");
            }
            p.login_threshold = n;
        }
        if let Some(n) = self.lockout_network_failures {
            if n == 0 {
                bail!("limits.lockout_network_failures must be at least 1");
            }
            p.network_threshold = n;
        }
        if let Some(s) = self.lockout_max_secs {
            if s == 0 {
                bail!("limits.lockout_max_secs must be at least 1");
            }
            p.max_lock = std::time::Duration::from_secs(s);
        }
        Ok(p)
    }

    fn resolve(self) -> anyhow::Result<mailgate_gateway::budget::Limits> {
        use std::time::Duration;
        let d = mailgate_gateway::budget::Limits::default();
        let positive = |key: &str, v: Option<usize>, default: usize| -> anyhow::Result<usize> {
            match v {
                Some(0) => bail!("limits.{key} must be at least 1"),
                Some(n) => Ok(n),
                None => Ok(default),
            }
        };
        let secs = |key: &str, v: Option<u64>, default: Duration| -> anyhow::Result<Duration> {
            match v {
                Some(0) => bail!("limits.{key} must be at least 1"),
                Some(n) => Ok(Duration::from_secs(n)),
                None => Ok(default),
            }
        };
        Ok(mailgate_gateway::budget::Limits {
            http_max_connections: positive(
                "http_max_connections",
                self.http_max_connections,
                d.http_max_connections,
            )?,
            http_max_connections_per_ip: positive(
                "http_max_connections_per_ip",
                self.http_max_connections_per_ip,
                d.http_max_connections_per_ip,
            )?,
            smtp_max_connections: positive(
                "smtp_max_connections",
                self.smtp_max_connections,
                d.smtp_max_connections,
            )?,
            smtp_max_connections_per_ip: positive(
                "smtp_max_connections_per_ip",
                self.smtp_max_connections_per_ip,
                d.smtp_max_connections_per_ip,
            )?,
            header_timeout: secs(
                "header_timeout_secs",
                self.header_timeout_secs,
                d.header_timeout,
            )?,
            http_idle_timeout: secs(
                "http_idle_timeout_secs",
                self.http_idle_timeout_secs,
                d.http_idle_timeout,
            )?,
            data_memory_bytes: positive(
                "data_memory_mb",
                self.data_memory_mb,
                d.data_memory_bytes / (1024 * 1024),
            )?
            .saturating_mul(1024 * 1024),
            password_concurrency: positive(
                "password_concurrency",
                self.password_concurrency,
                d.password_concurrency,
            )?,
            password_queue: self.password_queue.unwrap_or(d.password_queue),
            refusal_log_per_second: self
                .refusal_log_per_second
                .unwrap_or(d.refusal_log_per_second),
            unauthenticated_decisions_kept: self
                .unauthenticated_decisions_kept
                .unwrap_or(d.unauthenticated_decisions_kept),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    decisions_days: Option<u64>,
    messages_days: Option<u64>,
}

/// Days kept when `[retention]` does not say.
pub const DEFAULT_RETENTION_DAYS: u64 = 30;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<SocketAddr>,
    public_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttps {
    listen: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    submission_listen: Option<SocketAddr>,
    smtps_listen: Option<SocketAddr>,
    relay_listen: Option<SocketAddr>,
    bare_newline: Option<BareNewline>,
}

/// `smtp.bare_newline`: what a bare LF or CR in a message does (`mailgate_smtp::BareNewline`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BareNewline {
    Reject,
    Normalize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    reload_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the SQLite database and generated files live.
    pub data_dir: PathBuf,
    /// `[node] id` when set; `None`: derived once and kept in the data directory
    /// (`crate::node::node_id`).
    pub node_id: Option<String>,
    /// Plain-HTTP API listener (loopback only).
    pub http_listen: SocketAddr,
    /// The URL clients use to reach the HTTP API (written into service-account key files).
    pub public_url: String,
    /// HTTPS listener (reserved: served once TLS lands).
    pub https_listen: SocketAddr,
    /// TLS certificate chain PEM for HTTPS and SMTP.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key PEM.
    pub tls_key: Option<PathBuf>,
    /// SMTP submission (STARTTLS) listener (reserved).
    pub smtp_submission_listen: SocketAddr,
    /// SMTPS (implicit TLS) listener (reserved).
    pub smtps_listen: SocketAddr,
    /// SMTP relay listener (reserved).
    pub smtp_relay_listen: SocketAddr,
    /// How often a server checks the store for directory changes.
    pub reload_interval_ms: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (`info`, `mailgate=debug`, ...).
    pub log_level: String,
    /// The delivery worker (`[relay]`), resolved when `serve` starts it.
    pub relay: crate::relay_setup::RawRelay,
    /// Decisions older than this many days are deleted, unless a kept message names them
    /// (0: kept forever).
    pub retention_decisions_days: u64,
    /// Finished messages (delivered, failed, captured) older than this many days are deleted
    /// with their bodies and delivery history (0: kept forever).
    pub retention_messages_days: u64,
    /// Resource budgets (`[limits]`).
    pub limits: mailgate_gateway::budget::Limits,
    /// Failed-AUTH back-off (`[limits] lockout_*`).
    pub lockout: mailgate_gateway::lockout::LockoutPolicy,
    /// SMTP session limits (`[limits] smtp_*`).
    pub smtp_limits: mailgate_smtp::Limits,
    /// The store when one was named (`--database-url`, `MAILGATE_DATABASE_URL`, `[store] url`);
    /// `None`: the SQLite file under `data_dir` (see [`Config::store`]).
    pub store_url: Option<StoreLocation>,
}

fn addr(s: &str) -> SocketAddr {
    // The literals below are valid; a parse failure would be a programming error caught by tests.
    s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Config {
    /// Reads `path` (if given), then applies `--data-dir` and `--database-url` (each over what
    /// the file says), then validates.
    pub fn load(
        path: Option<&Path>,
        data_dir: Option<&Path>,
        database_url: Option<&str>,
    ) -> anyhow::Result<Config> {
        let raw = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?;
                toml::from_str::<RawConfig>(&text)
                    .with_context(|| format!("config file {} is not valid", p.display()))?
            }
            None => RawConfig::default(),
        };
        let mut cfg = Config::resolve(raw)?;
        if let Some(d) = data_dir {
            cfg.data_dir = d.to_owned();
        }
        if let Some(url) = database_url {
            cfg.store_url = Some(
                StoreLocation::parse(url)
                    .context("--database-url (or MAILGATE_DATABASE_URL) is not a store URL")?,
            );
        }
        Ok(cfg)
    }

    /// Fills defaults and checks the values.
    pub fn resolve(raw: RawConfig) -> anyhow::Result<Config> {
        let http_listen = raw.http.listen.unwrap_or(addr("127.0.0.1:7080"));
        if !http_listen.ip().is_loopback() {
            bail!(
                "http.listen = {http_listen}: the plain-HTTP listener may only bind a loopback address \
                 (127.0.0.0/8 or ::1); use https.listen for other addresses"
            );
        }
        let public_url = raw.http.public_url.unwrap_or_else(|| {
            let port = http_listen.port();
            format!("http://127.0.0.1:{port}")
        });
        let public_url = public_url.trim_end_matches('/').to_owned();
        let reload_interval_ms = raw.directory.reload_interval_ms.unwrap_or(500);
        if reload_interval_ms == 0 {
            bail!("directory.reload_interval_ms must be at least 1");
        }
        if raw.https.cert.is_some() != raw.https.key.is_some() {
            bail!("https.cert and https.key go together: give both or neither");
        }
        let store_url = match raw.store.url.as_deref() {
            Some(url) => Some(StoreLocation::parse(url).context("store.url is not a store URL")?),
            None => None,
        };
        Ok(Config {
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            node_id: raw.node.resolve()?,
            http_listen,
            public_url,
            https_listen: raw.https.listen.unwrap_or(addr("127.0.0.1:7443")),
            tls_cert: raw.https.cert,
            tls_key: raw.https.key,
            smtp_submission_listen: raw.smtp.submission_listen.unwrap_or(addr("127.0.0.1:7587")),
            smtps_listen: raw.smtp.smtps_listen.unwrap_or(addr("127.0.0.1:7465")),
            smtp_relay_listen: raw.smtp.relay_listen.unwrap_or(addr("127.0.0.1:7525")),
            reload_interval_ms,
            log_format: raw.log.format.unwrap_or_default(),
            log_level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
            relay: raw.relay,
            retention_decisions_days: raw
                .retention
                .decisions_days
                .unwrap_or(DEFAULT_RETENTION_DAYS),
            retention_messages_days: raw
                .retention
                .messages_days
                .unwrap_or(DEFAULT_RETENTION_DAYS),
            lockout: raw.limits.lockout()?,
            smtp_limits: mailgate_smtp::Limits {
                bare_newline: match raw.smtp.bare_newline {
                    None | Some(BareNewline::Reject) => mailgate_smtp::BareNewline::Reject,
                    Some(BareNewline::Normalize) => mailgate_smtp::BareNewline::Normalize,
                },
                ..raw.limits.smtp()?
            },
            limits: raw.limits.resolve()?,
            store_url,
        })
    }

    /// Where the store is: the URL named, else the SQLite file `mailgate.db` in the data
    /// directory.
    pub fn store(&self) -> StoreLocation {
        self.store_url
            .clone()
            .unwrap_or_else(|| StoreLocation::Sqlite(self.data_dir.join("mailgate.db")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ports() {
        let c = Config::resolve(RawConfig::default()).unwrap();
        assert_eq!(c.http_listen, addr("127.0.0.1:7080"));
        assert_eq!(c.https_listen.port(), 7443);
        assert_eq!(c.smtp_submission_listen.port(), 7587);
        assert_eq!(c.smtps_listen.port(), 7465);
        assert_eq!(c.smtp_relay_listen.port(), 7525);
        assert_eq!(c.public_url, "http://127.0.0.1:7080");
    }

    #[test]
    fn plain_http_off_loopback_is_refused() {
        let raw: RawConfig = toml::from_str("[http]\nlisten = \"0.0.0.0:7080\"\n").unwrap();
        let err = Config::resolve(raw).unwrap_err().to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn retention_defaults_to_thirty_days_and_zero_keeps_forever() {
        let c = Config::resolve(toml::from_str("").unwrap()).unwrap();
        assert_eq!(c.retention_decisions_days, DEFAULT_RETENTION_DAYS);
        assert_eq!(c.retention_messages_days, DEFAULT_RETENTION_DAYS);
        let raw = "[retention]\ndecisions_days = 0\nmessages_days = 7\n";
        let c = Config::resolve(toml::from_str(raw).unwrap()).unwrap();
        assert_eq!(
            (c.retention_decisions_days, c.retention_messages_days),
            (0, 7)
        );
    }

    #[test]
    fn limits_default_to_the_budget_and_zero_is_refused() {
        let c = Config::resolve(toml::from_str("").unwrap()).unwrap();
        let d = mailgate_gateway::budget::Limits::default();
        assert_eq!(
            c.limits.http_max_connections_per_ip,
            d.http_max_connections_per_ip
        );
        let raw = "[limits]\nsmtp_max_connections_per_ip = 3\nheader_timeout_secs = 2\ndata_memory_mb = 16\n";
        let c = Config::resolve(toml::from_str(raw).unwrap()).unwrap();
        assert_eq!(c.limits.smtp_max_connections_per_ip, 3);
        assert_eq!(c.limits.header_timeout.as_secs(), 2);
        assert_eq!(c.limits.data_memory_bytes, 16 * 1024 * 1024);
        let raw = "[limits]\nhttp_max_connections = 0\n";
        let err = Config::resolve(toml::from_str(raw).unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("limits.http_max_connections"),
            "{err}"
        );
    }

    #[test]
    fn bare_newlines_are_refused_unless_normalize_is_set() {
        let c = Config::resolve(toml::from_str("").unwrap()).unwrap();
        assert_eq!(
            c.smtp_limits.bare_newline,
            mailgate_smtp::BareNewline::Reject
        );
        let raw = "[smtp]\nbare_newline = \"normalize\"\n";
        let c = Config::resolve(toml::from_str(raw).unwrap()).unwrap();
        assert_eq!(
            c.smtp_limits.bare_newline,
            mailgate_smtp::BareNewline::Normalize
        );
        assert!(toml::from_str::<RawConfig>("[smtp]\nbare_newline = \"yes\"\n").is_err());
    }

    #[test]
    fn the_store_is_sqlite_under_the_data_dir_unless_a_url_names_one() {
        let c = Config::load(None, Some(Path::new("/var/d")), None).unwrap();
        assert_eq!(
            c.store(),
            StoreLocation::Sqlite(PathBuf::from("/var/d/mailgate.db"))
        );
        let raw = "[store]\nurl = \"postgres://mg@db:5432/mail\"\n";
        let c = Config::resolve(toml::from_str(raw).unwrap()).unwrap();
        assert_eq!(
            c.store(),
            StoreLocation::Postgres("postgres://mg@db:5432/mail".into())
        );
        assert_eq!(
            StoreLocation::parse("sqlite:///tmp/m.db").unwrap(),
            StoreLocation::Sqlite(PathBuf::from("/tmp/m.db"))
        );
        assert_eq!(
            StoreLocation::parse("postgresql://h/d")
                .unwrap()
                .sqlite_file(),
            None
        );
    }

    #[test]
    fn the_flag_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.toml");
        std::fs::write(&file, "[store]\nurl = \"postgres://file@h/d\"\n").unwrap();
        let c = Config::load(Some(&file), None, Some("postgres://flag@h/d")).unwrap();
        assert_eq!(
            c.store(),
            StoreLocation::Postgres("postgres://flag@h/d".into())
        );
        let c = Config::load(Some(&file), None, None).unwrap();
        assert_eq!(
            c.store(),
            StoreLocation::Postgres("postgres://file@h/d".into())
        );
    }

    #[test]
    fn another_scheme_is_refused_without_showing_the_password() {
        let err = format!(
            "{:#}",
            Config::load(None, None, Some("mysql://u:hunter2@h/d")).unwrap_err()
        );
        assert!(
            err.contains("`mysql`") && err.contains("postgres://"),
            "{err}"
        );
        assert!(err.contains("u:***@h"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let raw = "[store]\nurl = \"\"\n";
        assert!(Config::resolve(toml::from_str(raw).unwrap()).is_err());
        let shown = StoreLocation::parse("postgres://u:hunter2@h/d")
            .unwrap()
            .shown();
        assert_eq!(shown, "postgres://u:***@h/d");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<RawConfig>("[http]\nlissten = \"127.0.0.1:1\"\n").is_err());
    }

    /// Every key the parser accepts is documented in docs/config.md.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../../docs/config.md");
        for key in [
            "data_dir",
            "node.id",
            "http.listen",
            "http.public_url",
            "https.listen",
            "https.cert",
            "https.key",
            "smtp.submission_listen",
            "smtp.smtps_listen",
            "smtp.relay_listen",
            "smtp.bare_newline",
            "directory.reload_interval_ms",
            "log.format",
            "log.level",
            "relay.capture",
            "relay.max_age_secs",
            "relay.retry_initial_ms",
            "relay.retry_max_ms",
            "relay.lease_ms",
            "relay.poll_interval_ms",
            "relay.timeout_secs",
            "relay.helo_name",
            "relay.ca_file",
            "relay.xoauth2_smarthosts",
            "relay.workers",
            "retention.decisions_days",
            "retention.messages_days",
            "limits.http_max_connections",
            "limits.http_max_connections_per_ip",
            "limits.smtp_max_connections",
            "limits.smtp_max_connections_per_ip",
            "limits.header_timeout_secs",
            "limits.http_idle_timeout_secs",
            "limits.data_memory_mb",
            "limits.password_concurrency",
            "limits.password_queue",
            "limits.refusal_log_per_second",
            "limits.unauthenticated_decisions_kept",
            "limits.lockout_login_failures",
            "limits.lockout_network_failures",
            "limits.lockout_max_secs",
            "limits.smtp_soft_error_limit",
            "limits.smtp_hard_error_limit",
            "limits.smtp_commands_without_mail",
            "limits.smtp_idle_secs",
            "limits.smtp_idle_untrusted_secs",
            "limits.smtp_untrusted_lifetime_secs",
            "store.url",
        ] {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/config.md lacks `{key}`"
            );
        }
    }
}
