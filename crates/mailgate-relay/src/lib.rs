//! The delivery worker. It leases due messages from the queue ([`QueueStore`]), and either
//! captures them (capture mode: configured, or no smarthost in the directory) or relays them to the
//! smarthost routed by each recipient's domain, recording every recipient's outcome:
//!
//! - accepted: `delivered`;
//! - 5xx: `failed` with `upstream.refused` and the reply verbatim, and a DSN to the sender;
//! - 4xx, unreachable, TLS failure: `deferred` with `upstream.deferred`, retried with exponential
//!   backoff and jitter until the maximum age, then `failed` and a DSN;
//! - AUTH refused by the smarthost: `deferred` with `upstream.auth_failed`, and an error-level
//!   operator alert in the log.
//!
//! Leases: a batch is leased at once; while it is delivered the worker extends the leases not
//! yet recorded every third of `relay.lease_ms` ([`QueueStore::extend_lease`]), so a slow
//! smarthost does not let another worker or node lease (and deliver) the message again. Every
//! write-back passes the lease it was made under: one made after the lease was lost (the process
//! was paused past it, or its node took it back) changes nothing and is logged.
//!
//! Connections are reused across messages (one idle for a while is checked with NOOP first; one
//! used just now is not, and if the server closed it meanwhile the transaction runs again on a new
//! connection) and closed after 2 s without work (`IDLE_CLOSE`).

pub mod capture;
pub mod dsn;
pub mod smtp;
pub mod testing;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mailgate_core::directory::Smarthost;
use mailgate_store::{
    AttemptReport, LeasedMessage, NewMessage, QueueStore, RecipientOutcome, RecipientState,
    Recorded, StoreError,
};
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::smtp::{ConnectError, ConnectSettings, Connection};

/// Reason codes of delivery outcomes (rows 38-40 of docs/reasons.md).
pub mod codes {
    /// The smarthost refused (5xx).
    pub const REFUSED: &str = "upstream.refused";
    /// 4xx or unreachable; retried.
    pub const DEFERRED: &str = "upstream.deferred";
    /// The smarthost rejected our credentials.
    pub const AUTH_FAILED: &str = "upstream.auth_failed";
}

/// A fault that stops the worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS client configuration for smarthosts cannot be built: most often `relay.ca_file`
    /// holds no certificate, or one rustls refuses.
    #[error("relay.ca_file: cannot build the TLS client configuration for smarthosts: {0}")]
    Tls(#[from] mailgate_tls::TlsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Capture every message instead of relaying (also the behaviour when no smarthost exists).
    pub capture: bool,
    /// Give up on a recipient this long after acceptance (default 5 days).
    pub max_age: Duration,
    /// First retry delay; doubled per attempt (default 1 minute).
    pub retry_initial: Duration,
    /// Longest retry delay (default 1 hour).
    pub retry_max: Duration,
    /// How long a lease lasts; a crashed worker's messages are due again after it (default 5 min).
    pub lease: Duration,
    /// Longest sleep between queue checks (default 1 s).
    pub poll_interval: Duration,
    /// Connect and command timeout (default 60 s).
    pub timeout: Duration,
    /// EHLO name, Reporting-MTA and DSN sender domain.
    pub helo_name: String,
    /// PEM file with extra CA certificates trusted for smarthosts (a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Smarthosts (by name) that authenticate with XOAUTH2 (the password is the access token).
    pub xoauth2_smarthosts: Vec<String>,
    /// Lease owner name (unique per worker).
    pub worker_id: String,
    /// Messages per lease.
    pub batch: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            capture: false,
            max_age: Duration::from_secs(5 * 24 * 3600),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            lease: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            helo_name: "localhost".into(),
            ca_pem: None,
            xoauth2_smarthosts: Vec::new(),
            worker_id: format!("worker-{}-{:08x}", std::process::id(), fastrand::u32(..)),
            batch: 32,
        }
    }
}

/// The TLS client configuration for smarthosts: `mailgate_tls::client_config` (Mailgate's policy:
/// TLS 1.3 and 1.2, aws-lc-rs, the public web PKI roots) plus the certificates of `ca_pem`
/// (`relay.ca_file`, a private CA), no ALPN (SMTP has none).
pub fn tls_connector(ca_pem: Option<&[u8]>) -> Result<TlsConnector, RelayError> {
    let config = mailgate_tls::client_config(ca_pem, &[])?;
    Ok(TlsConnector::from(config))
}

/// The smarthost for a recipient: the one listing its domain, else the default route (a smarthost
/// with no domains).
pub fn route<'a>(smarthosts: &'a [Smarthost], recipient: &str) -> Option<&'a Smarthost> {
    let domain = recipient.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    smarthosts
        .iter()
        .find(|s| s.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)))
        .or_else(|| smarthosts.iter().find(|s| s.domains.is_empty()))
}

/// The delay before attempt number `attempts + 1`: `initial * 2^attempts`, capped at `max`, with
/// up to 25 % jitter either way so retries of many messages spread out.
pub fn backoff(attempts: i64, initial: Duration, max: Duration) -> Duration {
    let exp = attempts.clamp(0, 30) as u32;
    let base = initial
        .checked_mul(1u32 << exp.min(20))
        .unwrap_or(max)
        .min(max);
    let ms = base.as_millis() as u64;
    let jitter = ms / 4;
    let spread = if jitter > 0 {
        fastrand::u64(0..=2 * jitter)
    } else {
        0
    };
    Duration::from_millis((ms - jitter + spread).max(1))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long smarthost connections stay open without work.
const IDLE_CLOSE: Duration = Duration::from_secs(2);

/// How long a woken worker waits for more acceptances before leasing.
const WAKE_COALESCE: Duration = Duration::from_millis(10);

/// Longest a finished attempt waits to be recorded with the others of its batch.
const RECORD_EVERY: Duration = Duration::from_millis(100);

/// Where the worker reads the smarthosts in force (the live directory).
pub type SmarthostSource = Arc<dyn Fn() -> Vec<Smarthost> + Send + Sync>;

/// What wakes a set of workers: notified by the gateway on every acceptance. Only one worker at a
/// time gathers acceptances for its next lease; a notification that finds one gathering leaves
/// the others asleep (four workers each leasing a few messages cost four leases and four records
/// where one would do: measured, docs/performance.md). A worker that leases a full batch wakes
/// another, so more workers join as the queue grows.
#[derive(Debug, Clone)]
pub struct Wake {
    notify: Arc<Notify>,
    gathering: Arc<AtomicBool>,
}

impl Wake {
    /// Workers woken by `notify`.
    pub fn new(notify: Arc<Notify>) -> Wake {
        Wake {
            notify,
            gathering: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// At most one announcement to other nodes per this long ([`share_wakeups`]).
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(50);

/// Shares wake-ups with the other nodes of the queue, when it has any. `accepted` is this
/// node's acceptance signal (notified once per stored message); the answer is the signal this
/// node's workers should wait on ([`Wake::new`]), and the tasks doing it:
///
/// - a forwarder passes every local acceptance on to the workers at once, and to
/// - an announcer, which tells the other nodes ([`QueueStore::wake_others`]) at most once per
///   [`ANNOUNCE_EVERY`] however many acceptances there were (never inside an acceptance's
///   transaction: announcements stay off the send path), and
/// - the store's listener ([`QueueStore::spawn_wakeup_listener`]) wakes the workers when
///   another node announced.
///
/// A store with no other nodes (SQLite) has no listener: `accepted` is returned as it is and no
/// task runs. If the listener loses its connection the workers' polling (`relay.poll_interval_ms`)
/// still finds everything.
pub fn share_wakeups(
    store: Arc<dyn QueueStore>,
    node: &str,
    accepted: Arc<Notify>,
) -> (Arc<Notify>, Vec<tokio::task::JoinHandle<()>>) {
    let workers = Arc::new(Notify::new());
    let Some(listener) = store.spawn_wakeup_listener(node, workers.clone()) else {
        return (accepted, Vec::new());
    };
    let announce = Arc::new(Notify::new());
    let forwarder = {
        let (workers, announce) = (workers.clone(), announce.clone());
        tokio::spawn(async move {
            loop {
                accepted.notified().await;
                workers.notify_one();
                announce.notify_one();
            }
        })
    };
    let node = node.to_owned();
    let announcer = tokio::spawn(async move {
        loop {
            // Acceptances while this one is sent and during the pause leave one permit: the
            // next announcement covers them all.
            announce.notified().await;
            if let Err(e) = store.wake_others(&node).await {
                tracing::warn!(error = %e, "cannot wake the other nodes' delivery; they poll");
            }
            tokio::time::sleep(ANNOUNCE_EVERY).await;
        }
    });
    (workers, vec![listener, forwarder, announcer])
}

/// The delivery worker.
pub struct Relay {
    store: Arc<dyn QueueStore>,
    smarthosts: SmarthostSource,
    config: RelayConfig,
    settings: ConnectSettings,
    wake: Wake,
    connections: HashMap<String, Connection>,
    /// When held messages were last looked at (they are released at most once per poll interval).
    held_checked_ms: Option<i64>,
}

impl Relay {
    /// A worker over `store`, reading smarthosts from `smarthosts`.
    pub fn new(
        store: Arc<dyn QueueStore>,
        smarthosts: SmarthostSource,
        config: RelayConfig,
    ) -> Result<Relay, RelayError> {
        let settings = ConnectSettings {
            helo_name: config.helo_name.clone(),
            timeout: config.timeout,
            tls: tls_connector(config.ca_pem.as_deref())?,
            xoauth2: Arc::new(config.xoauth2_smarthosts.clone()),
        };
        Ok(Relay {
            store,
            smarthosts,
            config,
            settings,
            wake: Wake::new(Arc::new(Notify::new())),
            connections: HashMap::new(),
            held_checked_ms: None,
        })
    }

    /// A handle that wakes the worker (e.g. after a door accepted a message).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.notify.clone()
    }

    /// Uses `wake` (shared by several workers, notified by the gateway on every acceptance)
    /// instead of the worker's own.
    pub fn with_waker(mut self, wake: Wake) -> Relay {
        self.wake = wake;
        self
    }

    /// True when messages are captured rather than relayed right now.
    pub fn capturing(&self) -> bool {
        self.config.capture || (self.smarthosts)().is_empty()
    }

    /// Runs until the task is aborted. Store faults are logged and retried.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            tracing::info!(
                worker = %self.config.worker_id,
                capture = self.capturing(),
                "delivery worker started"
            );
            let mut last_work = Instant::now();
            loop {
                let worked = match self.run_once().await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %e, "delivery worker: store fault; retrying");
                        0
                    }
                };
                if worked > 0 {
                    last_work = Instant::now();
                    if worked >= self.config.batch as usize {
                        // More may be due than one worker takes at a time: get help, and go on.
                        self.wake.notify.notify_one();
                        continue;
                    }
                    // A lease short of a batch took everything due: no second lease to find
                    // nothing (on PostgreSQL a third of the delivery's statements under load,
                    // bench/postgres.sh). Mail accepted meanwhile left a wake-up permit, so the
                    // wait below ends at once for it.
                }
                // After work, the next wake-up or the poll interval, whichever first: while mail
                // flows every lease takes whatever else has come due (a retry, a held message),
                // so the next-due query (on PostgreSQL a scan of the pending messages) is only
                // worth it when the worker found nothing.
                let sleep = if worked > 0 {
                    self.config.poll_interval
                } else {
                    match self.store.next_due_ms().await {
                        Ok(Some(due)) => Duration::from_millis((due - now_ms()).max(0) as u64),
                        _ => self.config.poll_interval,
                    }
                }
                .clamp(Duration::from_millis(10), self.config.poll_interval);
                let until = tokio::time::Instant::now() + sleep;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {
                            // Smarthost connections are kept while mail flows, closed when idle.
                            if last_work.elapsed() >= IDLE_CLOSE {
                                self.close_connections().await;
                            }
                        }
                        _ = self.wake.notify.notified() => {
                            // Another worker is gathering: it leases these too; wait on.
                            if self.wake.gathering.swap(true, Ordering::AcqRel) {
                                continue;
                            }
                            // Let a few more acceptances arrive: one lease and one record for
                            // several messages instead of one each (the write connection is
                            // shared with acceptance, so fewer transactions here is lower
                            // latency there).
                            tokio::time::sleep(WAKE_COALESCE).await;
                            // Acceptances from now on are for the next gatherer.
                            self.wake.gathering.store(false, Ordering::Release);
                        }
                    }
                    break;
                }
            }
        })
    }

    async fn close_connections(&mut self) {
        for (_, c) in self.connections.drain() {
            c.close().await;
        }
    }

    /// One pass: releases held messages, leases a batch and handles it. Returns how many messages
    /// were handled.
    pub async fn run_once(&mut self) -> Result<usize, StoreError> {
        let now = now_ms();
        let poll = self.config.poll_interval.as_millis() as i64;
        if self.held_checked_ms.is_none_or(|t| now - t >= poll) {
            self.store.release_held(now).await?;
            self.held_checked_ms = Some(now);
        }
        let batch = self
            .store
            .lease_due(
                &self.config.worker_id,
                now,
                self.config.lease.as_millis() as i64,
                self.config.batch,
            )
            .await?;
        let n = batch.len();
        let mut leases = Leases::new(&self.config, &batch);
        let smarthosts = (self.smarthosts)();
        let capture = self.config.capture || smarthosts.is_empty();
        let mut pending: Vec<AttemptReport> = Vec::new();
        let mut pending_since: Option<Instant> = None;
        for m in batch {
            if capture {
                match self
                    .store
                    .mark_captured(&self.config.worker_id, &m.id, m.lease, now_ms())
                    .await?
                {
                    Recorded::State(_) => {
                        tracing::info!(message_id = %m.id, "message captured (capture mode)")
                    }
                    Recorded::LeaseLost => lease_lost(&m.id, m.lease),
                }
                leases.forget(&m.id);
            } else {
                leases.extend_if_due(&*self.store).await;
                if !leases.holds(&m.id) {
                    // Lost while earlier messages of the batch were delivered: another worker
                    // has it now.
                    tracing::warn!(message_id = %m.id, lease = m.lease, "lease lost before delivery; not delivering");
                    continue;
                }
                let store = self.store.clone();
                let report = {
                    let attempt = self.deliver(&smarthosts, m);
                    tokio::pin!(attempt);
                    loop {
                        tokio::select! {
                            report = &mut attempt => break report,
                            _ = tokio::time::sleep_until(leases.next_extension) => {
                                leases.extend_if_due(&*store).await;
                            }
                        }
                    }
                };
                pending.push(report);
                // Record in batches, but never sit long on finished attempts.
                let since = *pending_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= RECORD_EVERY {
                    leases.extend_if_due(&*self.store).await;
                    leases.forget_all(&pending);
                    self.record(&mut pending).await?;
                    pending_since = None;
                }
            }
        }
        leases.extend_if_due(&*self.store).await;
        self.record(&mut pending).await?;
        Ok(n)
    }

    /// The open connection to `sh`, or a new one. Returns with it whether it is known to work
    /// (new, or answered a NOOP just now) rather than merely recently used.
    async fn connection(
        &mut self,
        sh: &Smarthost,
    ) -> Result<(&mut Connection, bool), ConnectError> {
        let reuse = match self.connections.get_mut(&sh.name) {
            Some(c) if c.recently_used() => Some(false),
            Some(c) => c.alive().await.then_some(true),
            None => None,
        };
        let checked = match reuse {
            Some(checked) => checked,
            None => {
                self.connections.remove(&sh.name);
                let c = Connection::open(sh, &self.settings).await?;
                self.connections.insert(sh.name.clone(), c);
                true
            }
        };
        let c = self
            .connections
            .get_mut(&sh.name)
            .ok_or_else(|| ConnectError::Unavailable("connection vanished".into()))?;
        Ok((c, checked))
    }

    /// Runs one SMTP transaction with `sh`. A connection reused without a probe that turns out
    /// closed (it breaks at MAIL FROM, before the server took anything) is replaced once.
    async fn transact(
        &mut self,
        sh: &Smarthost,
        from: &str,
        rcpts: &[String],
        raw: &[u8],
    ) -> Result<Vec<smtp::Outcome>, ConnectError> {
        let mut retried = false;
        loop {
            let (conn, checked) = self.connection(sh).await?;
            match conn.transaction(from, rcpts, raw).await {
                Ok(list) => return Ok(list),
                Err(b) if b.before_mail && !checked && !retried => {
                    tracing::debug!(smarthost = %sh.name, reason = %b.reason, "idle connection was closed; reconnecting");
                    self.connections.remove(&sh.name);
                    retried = true;
                }
                Err(b) => {
                    return Err(ConnectError::Unavailable(format!(
                        "smarthost {} ({}:{}): connection lost: {}",
                        sh.name, sh.host, sh.port, b.reason
                    )));
                }
            }
        }
    }

    /// Makes one delivery attempt of `m`; the caller records the report.
    async fn deliver(&mut self, smarthosts: &[Smarthost], m: LeasedMessage) -> AttemptReport {
        let at = now_ms();
        if m.possible_duplicate {
            tracing::warn!(
                message_id = %m.id,
                "delivering a message whose previous lease ended without a recorded outcome: it may have been delivered already (possible_duplicate in its history)"
            );
        }
        // Group the remaining recipients by route.
        let mut groups: Vec<(Smarthost, Vec<String>)> = Vec::new();
        let mut outcomes: Vec<(RecipientOutcome, Option<String>)> = Vec::new();
        for (rcpt, _) in &m.recipients {
            match route(smarthosts, rcpt) {
                Some(sh) => match groups.iter_mut().find(|(s, _)| s.name == sh.name) {
                    Some((_, v)) => v.push(rcpt.clone()),
                    None => groups.push((sh.clone(), vec![rcpt.clone()])),
                },
                None => outcomes.push((
                    RecipientOutcome {
                        recipient: rcpt.clone(),
                        state: RecipientState::Deferred,
                        code: Some(codes::DEFERRED.into()),
                        reply: Some(
                            "no smarthost routes this recipient's domain and none is the default route"
                                .into(),
                        ),
                    },
                    None,
                )),
            }
        }
        let mut smarthost_names = Vec::new();
        for (sh, rcpts) in groups {
            smarthost_names.push(sh.name.clone());
            let remote = Some(format!("{} ({})", sh.host, sh.name));
            let result = self.transact(&sh, &m.envelope_from, &rcpts, &m.raw).await;
            match result {
                Ok(list) => {
                    for o in list {
                        let code = match o.state {
                            RecipientState::Failed => Some(codes::REFUSED.to_owned()),
                            RecipientState::Deferred | RecipientState::Pending => {
                                Some(codes::DEFERRED.to_owned())
                            }
                            RecipientState::Delivered => None,
                        };
                        outcomes.push((
                            RecipientOutcome {
                                recipient: o.recipient,
                                state: o.state,
                                code,
                                reply: Some(o.reply),
                            },
                            remote.clone(),
                        ));
                    }
                    // Recipients the transaction did not answer for (cannot happen with a
                    // complete transaction, but never lose one).
                    for r in &rcpts {
                        if !outcomes.iter().any(|(o, _)| &o.recipient == r) {
                            outcomes.push((
                                deferred(r, "no outcome reported", codes::DEFERRED),
                                remote.clone(),
                            ));
                        }
                    }
                }
                Err(e) => {
                    self.connections.remove(&sh.name);
                    let code = match &e {
                        ConnectError::AuthRejected(reply) => {
                            tracing::error!(
                                alert = "operator",
                                smarthost = %sh.name,
                                host = %sh.host,
                                reply = %reply,
                                "OPERATOR ALERT: the smarthost rejected Mailgate's credentials (upstream.auth_failed); mail to it waits in the queue until they are fixed"
                            );
                            codes::AUTH_FAILED
                        }
                        ConnectError::Unavailable(reason) => {
                            tracing::warn!(smarthost = %sh.name, reason = %reason, "smarthost unavailable; deferring");
                            codes::DEFERRED
                        }
                    };
                    for r in &rcpts {
                        outcomes.push((deferred(r, &e.to_string(), code), remote.clone()));
                    }
                }
            }
        }

        // Past the maximum age, deferral becomes failure.
        let expired = at - m.accepted_at_ms >= self.config.max_age.as_millis() as i64;
        if expired {
            for (o, _) in outcomes.iter_mut() {
                if o.state == RecipientState::Deferred {
                    o.state = RecipientState::Failed;
                    o.reply = Some(format!(
                        "{} (gave up: not delivered within {} s of acceptance)",
                        o.reply.as_deref().unwrap_or(""),
                        self.config.max_age.as_secs()
                    ));
                }
            }
        }
        let any_waiting = outcomes.iter().any(|(o, _)| !o.state.is_final());
        let next_attempt_ms = any_waiting.then(|| {
            let delay = backoff(m.attempts, self.config.retry_initial, self.config.retry_max);
            (at + delay.as_millis() as i64)
                .min(m.accepted_at_ms + self.config.max_age.as_millis() as i64)
                .max(at + 1)
        });

        let failed: Vec<dsn::FailedRecipient> = outcomes
            .iter()
            .filter(|(o, _)| o.state == RecipientState::Failed)
            .map(|(o, remote)| {
                let diag = o.reply.clone().unwrap_or_default();
                dsn::FailedRecipient {
                    recipient: o.recipient.clone(),
                    status: if expired && o.code.as_deref() != Some(codes::REFUSED) {
                        "4.4.7".into()
                    } else {
                        dsn::status_of(&diag, true)
                    },
                    remote_mta: remote.clone(),
                    diagnostic: diag,
                }
            })
            .collect();
        let dsn = if failed.is_empty() {
            None
        } else if m.envelope_from.is_empty() {
            tracing::warn!(message_id = %m.id, "a bounce could not be delivered; no DSN for a null sender");
            None
        } else {
            match dsn::build(&dsn::DsnInput {
                reporting_mta: &self.config.helo_name,
                message_id: &m.id,
                arrival_secs: m.accepted_at_ms / 1000,
                now_secs: at / 1000,
                to: &m.envelope_from,
                failed: &failed,
                original: &m.raw,
            }) {
                Ok(raw) => Some(NewMessage {
                    id: mailgate_store::new_message_id(at.max(0) as u64),
                    decision_id: m.decision_id.clone(),
                    accepted_at_ms: at,
                    door: "dsn".into(),
                    principal: "mailgate:dsn".into(),
                    envelope_from: String::new(),
                    recipients: vec![m.envelope_from.clone()],
                    raw,
                    state: mailgate_store::MessageState::Queued,
                    hold_until_ms: None,
                }),
                Err(e) => {
                    tracing::error!(message_id = %m.id, error = %e, "cannot build a DSN");
                    None
                }
            }
        };
        AttemptReport {
            message_id: m.id.clone(),
            lease: m.lease,
            at_ms: at,
            smarthost: (!smarthost_names.is_empty()).then(|| smarthost_names.join(",")),
            outcomes: outcomes.into_iter().map(|(o, _)| o).collect(),
            next_attempt_ms,
            dsn,
        }
    }

    /// Records the attempts made so far in one transaction (a crash before this means those
    /// messages are delivered again once their lease expires: at-least-once, never lost).
    async fn record(&mut self, reports: &mut Vec<AttemptReport>) -> Result<(), StoreError> {
        if reports.is_empty() {
            return Ok(());
        }
        let recorded = self
            .store
            .record_attempts(&self.config.worker_id, reports)
            .await?;
        let mut dsn_queued = false;
        for (report, r) in reports.drain(..).zip(recorded) {
            let dsn_id = report.dsn.as_ref().map(|d| d.id.as_str());
            match r {
                Recorded::State(state) => {
                    tracing::info!(
                        message_id = %report.message_id,
                        state = %state,
                        delivered = report.outcomes.iter().filter(|o| o.state == RecipientState::Delivered).count(),
                        deferred = report.outcomes.iter().filter(|o| o.state == RecipientState::Deferred).count(),
                        failed = report.outcomes.iter().filter(|o| o.state == RecipientState::Failed).count(),
                        dsn = dsn_id.unwrap_or("-"),
                        "delivery attempt recorded"
                    );
                    dsn_queued |= dsn_id.is_some();
                }
                Recorded::LeaseLost => lease_lost(&report.message_id, report.lease),
            }
        }
        if dsn_queued {
            self.wake.notify.notify_one();
        }
        Ok(())
    }
}

/// A write-back refused by the store's fence: logged, never retried.
fn lease_lost(message_id: &str, lease: i64) {
    tracing::warn!(
        message_id,
        lease,
        "lease lost: this worker's late write-back changed nothing (another worker or node holds the message now, or this node took its leases back)"
    );
}

/// The leases of one batch not yet written back, extended every third of the lease's length
/// while the batch is delivered.
struct Leases {
    owner: String,
    lease_ms: i64,
    every: Duration,
    held: Vec<(String, i64)>,
    next_extension: tokio::time::Instant,
}

impl Leases {
    fn new(config: &RelayConfig, batch: &[LeasedMessage]) -> Leases {
        let every = (config.lease / 3).max(Duration::from_millis(5));
        Leases {
            owner: config.worker_id.clone(),
            lease_ms: config.lease.as_millis() as i64,
            every,
            held: batch.iter().map(|m| (m.id.clone(), m.lease)).collect(),
            next_extension: tokio::time::Instant::now() + every,
        }
    }

    fn holds(&self, id: &str) -> bool {
        self.held.iter().any(|(h, _)| h == id)
    }

    fn forget(&mut self, id: &str) {
        self.held.retain(|(h, _)| h != id);
    }

    /// The leases of `reports`, about to be written back, need no more extension.
    fn forget_all(&mut self, reports: &[AttemptReport]) {
        self.held
            .retain(|(h, _)| !reports.iter().any(|r| &r.message_id == h));
    }

    /// Extends the leases still held when it is time. A lease found lost is dropped (its
    /// write-back will change nothing); a store fault is logged and tried again next time.
    async fn extend_if_due(&mut self, store: &dyn QueueStore) {
        if tokio::time::Instant::now() < self.next_extension {
            return;
        }
        self.next_extension = tokio::time::Instant::now() + self.every;
        if self.held.is_empty() {
            return;
        }
        match store
            .extend_lease(&self.owner, &self.held, now_ms(), self.lease_ms)
            .await
        {
            Ok(outcomes) => {
                let mut i = 0;
                self.held.retain(|(id, lease)| {
                    let kept = !matches!(outcomes.get(i), Some(Recorded::LeaseLost));
                    if !kept {
                        tracing::warn!(message_id = %id, lease, "lease lost while delivering: another worker holds the message now");
                    }
                    i += 1;
                    kept
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot extend the delivery leases; retrying"),
        }
    }
}

fn deferred(rcpt: &str, reply: &str, code: &str) -> RecipientOutcome {
    RecipientOutcome {
        recipient: rcpt.to_owned(),
        state: RecipientState::Deferred,
        code: Some(code.to_owned()),
        reply: Some(reply.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use mailgate_core::directory::SmarthostTls;

    fn sh(name: &str, domains: &[&str]) -> Smarthost {
        Smarthost {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 25,
            tls: SmarthostTls::None,
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            username: None,
            password_ref: None,
        }
    }

    #[test]
    fn routes_by_domain_then_default() {
        let hosts = [sh("eu", &["example.eu"]), sh("default", &[])];
        assert_eq!(route(&hosts, "a@EXAMPLE.eu").unwrap().name, "eu");
        assert_eq!(route(&hosts, "a@example.org").unwrap().name, "default");
        assert!(route(&hosts[..1], "a@example.org").is_none());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_secs(60);
        let m = Duration::from_secs(3600);
        for _ in 0..100 {
            let d0 = backoff(0, i, m);
            assert!(d0 >= Duration::from_secs(45) && d0 <= Duration::from_secs(75));
            let d3 = backoff(3, i, m);
            assert!(d3 >= Duration::from_secs(360) && d3 <= Duration::from_secs(600));
            let big = backoff(50, i, m);
            assert!(big <= Duration::from_secs(4500));
        }
    }

    #[test]
    fn tls_connector_needs_a_certificate_in_the_ca_file() {
        assert!(tls_connector(None).is_ok());
        let (cert, _) = mailgate_tls::self_signed(&["smarthost.test"]).unwrap();
        assert!(tls_connector(Some(cert.as_bytes())).is_ok());
        // The operator learns which setting is wrong and what is wrong with it.
        let err = tls_connector(Some(b"not a pem")).err().unwrap().to_string();
        assert!(
            err.contains("relay.ca_file") && err.contains("no CERTIFICATE block"),
            "{err}"
        );
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = tls_connector(Some(broken.as_bytes()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("relay.ca_file"), "{err}");
    }
}
