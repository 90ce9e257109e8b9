//! The server's and the commands' log: to standard error, text or JSON, `MAILGATE_LOG` filters.

use crate::config::{Config, LogFormat};

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

pub(crate) fn init_logging(config: &Config, default_level: &str) {
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
