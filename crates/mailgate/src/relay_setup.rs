//! The `[relay]` section of the configuration and starting the delivery worker in `serve`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mailgate_gateway::Gateway;
use mailgate_relay::{Relay, RelayConfig};
use mailgate_store::QueueStore;
use serde::Deserialize;

/// `[relay]` as the file says it (every key optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelay {
    /// Capture instead of relaying (default: true with `--demo`, else false).
    capture: Option<bool>,
    /// Give up (and bounce) this long after acceptance.
    max_age_secs: Option<u64>,
    /// First retry delay.
    retry_initial_ms: Option<u64>,
    /// Longest retry delay.
    retry_max_ms: Option<u64>,
    /// Lease length: a crashed worker's messages are taken over after it.
    lease_ms: Option<u64>,
    /// Longest pause between queue checks.
    poll_interval_ms: Option<u64>,
    /// Connect and command timeout towards smarthosts.
    timeout_secs: Option<u64>,
    /// EHLO name, also the DSN sender's domain.
    helo_name: Option<String>,
    /// Extra CA certificates (PEM) trusted for smarthosts.
    ca_file: Option<PathBuf>,
    /// Smarthosts (by name) that authenticate with XOAUTH2.
    #[serde(default)]
    xoauth2_smarthosts: Vec<String>,
    /// Delivery workers in this process (each with its own connections and leases).
    workers: Option<u32>,
}

/// Delivery workers when `[relay] workers` is not set: enough to overlap one message's SMTP
/// round trips and database write with another's.
pub const DEFAULT_WORKERS: u32 = 4;

/// Resolves `[relay]` (reading the CA file).
pub fn relay_config(raw: &RawRelay, demo: bool) -> anyhow::Result<RelayConfig> {
    let d = RelayConfig::default();
    let ms = |v: Option<u64>, dflt: Duration| v.map(Duration::from_millis).unwrap_or(dflt);
    let secs = |v: Option<u64>, dflt: Duration| v.map(Duration::from_secs).unwrap_or(dflt);
    let ca_pem = match &raw.ca_file {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read relay.ca_file {}", p.display()))?,
        ),
        None => None,
    };
    let cfg = RelayConfig {
        capture: raw.capture.unwrap_or(demo),
        max_age: secs(raw.max_age_secs, d.max_age),
        retry_initial: ms(raw.retry_initial_ms, d.retry_initial),
        retry_max: ms(raw.retry_max_ms, d.retry_max),
        lease: ms(raw.lease_ms, d.lease),
        poll_interval: ms(raw.poll_interval_ms, Duration::from_millis(500)),
        timeout: secs(raw.timeout_secs, d.timeout),
        helo_name: raw.helo_name.clone().unwrap_or(d.helo_name.clone()),
        ca_pem,
        xoauth2_smarthosts: raw.xoauth2_smarthosts.clone(),
        worker_id: d.worker_id.clone(),
        batch: d.batch,
    };
    anyhow::ensure!(
        !cfg.retry_initial.is_zero() && !cfg.poll_interval.is_zero() && !cfg.lease.is_zero(),
        "relay.retry_initial_ms, relay.poll_interval_ms and relay.lease_ms must be at least 1"
    );
    Ok(cfg)
}

/// `relay.workers`, checked.
pub fn worker_count(raw: &RawRelay) -> anyhow::Result<u32> {
    let workers = raw.workers.unwrap_or(DEFAULT_WORKERS);
    anyhow::ensure!(
        (1..=64).contains(&workers),
        "relay.workers must be between 1 and 64 (found {workers})"
    );
    Ok(workers)
}

/// Takes back the leases this node's earlier run held (it was killed, or stopped mid-delivery),
/// before its delivery workers start: those messages are due at once, not after `relay.lease_ms`.
/// Returns how many there were.
pub async fn take_back_leases(queue: &dyn QueueStore, node: &str) -> anyhow::Result<u64> {
    let now = i64::try_from(mailgate_gateway::now_ms()).unwrap_or(i64::MAX);
    let n = queue
        .reclaim_leases(node, now)
        .await
        .with_context(|| format!("cannot take back the leases of node {node}"))?;
    if n > 0 {
        tracing::info!(
            node,
            messages = n,
            "delivery: took back the messages this node was delivering when it last stopped; they are due now"
        );
    }
    Ok(n)
}

/// Starts the delivery workers on the gateway's live directory (its smarthosts). They share
/// the gateway's acceptance signal, so a stored message is picked up at once, not at the next poll;
/// on a queue other nodes share, their acceptances wake these workers too
/// (`mailgate_relay::share_wakeups`).
/// Worker `i`'s leases are owned by `<node>/<run>/<i>` (`mailgate_store::lease_owner`, `run`
/// random per start); call [`take_back_leases`] first.
pub fn spawn(
    raw: &RawRelay,
    demo: bool,
    gateway: &Arc<Gateway>,
    queue: Arc<dyn QueueStore>,
    node: &str,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let cfg = relay_config(raw, demo)?;
    let workers = worker_count(raw)?;
    // With other nodes on the queue, acceptances here wake their workers and theirs wake ours.
    let (signal, mut handles) =
        mailgate_relay::share_wakeups(queue.clone(), node, gateway.accepted_signal());
    let wake = mailgate_relay::Wake::new(signal);
    // Base64url: no `/` in it.
    let run = mailgate_auth::random_token::<6>()
        .map_err(|e| anyhow::anyhow!("cannot name this run's leases: {e}"))?;
    for i in 0..workers {
        let g = gateway.clone();
        let relay = Relay::new(
            queue.clone(),
            Arc::new(move || g.live().index.directory().smarthosts.clone()),
            RelayConfig {
                worker_id: mailgate_store::lease_owner(node, &run, i),
                ..cfg.clone()
            },
        )?
        .with_waker(wake.clone());
        handles.push(relay.spawn());
    }
    if cfg.capture {
        tracing::info!(
            "delivery: capture mode (relay.capture = true): accepted mail is kept, listed by `mailgate captured list`, and never relayed"
        );
    } else {
        watch_delivery_mode(gateway.clone());
    }
    Ok(handles)
}

/// What the delivery workers do with the directory's smarthosts (`relay.capture` off): capture
/// while there is none, relay once there is one.
fn delivery_mode(smarthosts: &[mailgate_core::directory::Smarthost]) -> String {
    if smarthosts.is_empty() {
        "delivery: capture mode (the directory has no smarthost): accepted mail is kept, listed by `mailgate captured list`, and not relayed; add a smarthost to relay".to_owned()
    } else {
        let names: Vec<&str> = smarthosts.iter().map(|s| s.name.as_str()).collect();
        format!(
            "delivery: relaying through the directory's smarthosts ({})",
            names.join(", ")
        )
    }
}

/// Logs the delivery mode at start and again whenever a directory change moves it (a smarthost
/// added or the last one removed), so the log never says "capture mode" while mail is relayed.
fn watch_delivery_mode(gateway: Arc<Gateway>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<String> = None;
        loop {
            tick.tick().await;
            let now = delivery_mode(&gateway.live().index.directory().smarthosts);
            if last.as_deref() != Some(now.as_str()) {
                tracing::info!("{now}");
                last = Some(now);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_captures_unless_told_otherwise() -> anyhow::Result<()> {
        assert!(relay_config(&RawRelay::default(), true)?.capture);
        assert!(!relay_config(&RawRelay::default(), false)?.capture);
        let raw: RawRelay = toml::from_str("capture = false\nretry_initial_ms = 5")?;
        let c = relay_config(&raw, true)?;
        assert!(!c.capture);
        assert_eq!(c.retry_initial, Duration::from_millis(5));
        assert_eq!(c.max_age, Duration::from_secs(5 * 24 * 3600));
        Ok(())
    }

    #[test]
    fn delivery_mode_follows_the_smarthosts() -> anyhow::Result<()> {
        assert!(delivery_mode(&[]).contains("capture mode"));
        let hosts: Vec<mailgate_core::directory::Smarthost> = serde_json::from_value(
            serde_json::json!([{"name": "sink", "host": "127.0.0.1", "port": 25, "tls": "none"}]),
        )?;
        let relaying = delivery_mode(&hosts);
        assert!(!relaying.contains("capture"), "{relaying}");
        assert!(relaying.contains("(sink)"), "{relaying}");
        Ok(())
    }

    #[test]
    fn worker_count_defaults_and_bounds() -> anyhow::Result<()> {
        assert_eq!(worker_count(&RawRelay::default())?, DEFAULT_WORKERS);
        assert_eq!(worker_count(&toml::from_str("workers = 1")?)?, 1);
        let zero = worker_count(&toml::from_str("workers = 0")?).unwrap_err();
        assert!(zero.to_string().contains("relay.workers"), "{zero}");
        assert!(worker_count(&toml::from_str("workers = 65")?).is_err());
        Ok(())
    }
}
