//! The service layer between the front doors and the core: every door holds an `Arc<Gateway>` and
//! calls the same four things, so no door can skip a rule or answer "accepted" early.
//!
//! 1. [`Gateway::live`]: the directory in force (an immutable snapshot with the engine's index,
//!    swapped atomically when the store's generation moves).
//! 2. [`Gateway::decide`]: the engine's decision for an attempt, kept under a `decision_id`
//!    (denials always; allowed ones too, so the id the client sees always resolves).
//! 3. [`Gateway::accept`]: charges the usage counters atomically and stores the message and the
//!    usage in one durable transaction. Only after it returns may a door say "accepted".
//! 4. [`Gateway::explain`]: the same evaluation in explain mode, consuming nothing.
//!
//! It is also the floor the doors share, so that no door depends on another: who a presented
//! secret speaks for ([`credentials`]: API keys, OAuth access tokens), the facts of the
//! connection a request came over ([`conn`]), and how HTTP request bodies are read and refused
//! ([`body`]).

pub mod body;
pub mod budget;
pub mod conn;
pub mod credentials;
mod edit;
pub mod lockout;
pub mod message;
pub mod nodes;
mod seen;
mod trace;
pub use conn::ConnFacts;
pub use credentials::{ApiKeyMatch, Grant};
pub use edit::{CONFLICT_RETRIES, EditError, edit_directory};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};
use mailgate_core::engine::{
    CommitOutcome, Counters, Decision, DirectoryIndex, InjectedFault, MemoryCounters, Mode,
    Outcome, SendAttempt, Verdict, apply_injected, commit, decide,
};
use mailgate_store::{
    MessageState, NewMessage, Store, StoreError, StoredDecision, StoredVerdict, TraceJson,
    UsageEntry,
};
use serde_json::{Value, json};

/// A fault (never a refusal: refusals are [`Decision`]s).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The usage counters failed.
    #[error(transparent)]
    Counters(#[from] mailgate_core::engine::CountersError),
    /// The decision cannot be accepted (denied or incomplete): a door bug.
    #[error("decision {0} is not an acceptance")]
    NotAccepted(String),
    /// Every message-id node number is held by another running node ([`Gateway::join_as`]).
    #[error(
        "cannot join as node {0:?}: all {n} message-id node numbers are held by other running nodes of this store (a stopped node's number is free {lease} s after its last heartbeat; a node started again with the same [node] id takes its own number back at once)",
        n = mailgate_store::NODE_NUMBERS,
        lease = nodes::NODE_NUMBER_LEASE.as_secs()
    )]
    NodeNumbersTaken(String),
}

/// The directory in force.
pub struct Live {
    /// Store generation it was loaded at.
    pub generation: i64,
    /// The engine's index; `index.directory()` is the directory itself.
    pub index: DirectoryIndex,
}

/// A decision with the id it is kept under.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The engine's answer.
    pub decision: Decision,
    /// Where its trace is kept (`GET /mailgate/v1/decisions/{id}`).
    pub id: String,
}

/// What [`Gateway::accept`] did.
#[derive(Debug, Clone)]
pub enum Accepted {
    /// Stored durably: answer "accepted" with this message id.
    Stored {
        /// Message id.
        message_id: String,
        /// [`MessageState::Queued`] or [`MessageState::Held`].
        state: MessageState,
    },
    /// A concurrent send used the last of a limit since the decision. Nothing was stored; this
    /// is the new decision (a denial) to answer with (boxed: a decision carries its trace).
    Refused(Box<Decided>),
}

/// A message to accept.
#[derive(Debug, Clone)]
pub struct Message {
    /// SMTP envelope sender (after any rewrite).
    pub envelope_from: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// The RFC 5322 message.
    pub raw: Vec<u8>,
}

/// The gateway's shared state.
pub struct Gateway {
    store: Arc<dyn Store>,
    live: ArcSwap<Live>,
    counters: MemoryCounters,
    /// Faults injected by `mailgate simulate` (see [`Gateway::set_injected_faults`]).
    faults: ArcSwap<Vec<InjectedFault>>,
    /// Notified once per stored message (wakes a delivery worker).
    accepted: Arc<tokio::sync::Notify>,
    /// Resource budgets shared by every door and listener.
    budget: budget::Budget,
    /// The last write that failed, until one succeeds (`/healthz` says `degraded`).
    write_fault: std::sync::Mutex<Option<String>>,
    /// Refusals before authentication: kept here (bounded), never in the store.
    unauthenticated: std::sync::Mutex<UnauthenticatedRing>,
    /// Failed-authentication lockout shared by every door (SMTP AUTH, the Gmail consent page).
    lockout: lockout::Lockout,
    /// This process as a node of the store ([`nodes`]).
    node: nodes::NodeIdentity,
    /// This process as the node [`Gateway::join_as`] named (its row in `nodes`).
    joined: std::sync::OnceLock<nodes::NodeIdentity>,
    /// `<node>/<run>`: who holds this node's concurrent-send slots ([`Gateway::join_as`]).
    slot_holder: std::sync::OnceLock<String>,
    /// The message-id node number this node leased ([`Gateway::join_as`]); [`NOT_JOINED`] before.
    node_number: std::sync::atomic::AtomicU16,
    /// Shared counters: the usage this node last saw in the store, by principal ([`seen`]).
    seen: seen::SeenUsage,
}

/// [`Gateway::node_number`] before [`Gateway::join_as`].
const NOT_JOINED: u16 = u16::MAX;

/// Aborts a task when dropped (the reloader's change listener ends with the reloader).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The last refusals of unauthenticated attempts, by id (oldest dropped first).
#[derive(Default)]
struct UnauthenticatedRing {
    order: std::collections::VecDeque<String>,
    by_id: std::collections::HashMap<String, StoredDecision>,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Gateway {
    /// Loads the directory, the last 24 h of usage and the injected faults in force from `store`.
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<Gateway>, GatewayError> {
        Gateway::open_with_limits(store, budget::Limits::default()).await
    }

    /// [`Gateway::open`] with the configured resource budgets.
    pub async fn open_with_limits(
        store: Arc<dyn Store>,
        limits: budget::Limits,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let snap = store.snapshot().await?;
        // Shared counters live in the store: nothing to replay into this process.
        let counters = if store.shared_counters().is_some() {
            MemoryCounters::new()
        } else {
            load_counters(store.as_ref(), now_ms()).await?
        };
        let gateway = Arc::new(Gateway {
            store,
            live: ArcSwap::from_pointee(Live {
                generation: snap.generation,
                index: DirectoryIndex::new(&snap.directory),
            }),
            counters,
            faults: ArcSwap::from_pointee(Vec::new()),
            accepted: Arc::new(tokio::sync::Notify::new()),
            budget: budget::Budget::new(limits),
            unauthenticated: Default::default(),
            lockout: lockout::Lockout::default(),
            write_fault: std::sync::Mutex::new(None),
            node: nodes::NodeIdentity::current(),
            joined: std::sync::OnceLock::new(),
            slot_holder: std::sync::OnceLock::new(),
            seen: seen::SeenUsage::default(),
            node_number: std::sync::atomic::AtomicU16::new(NOT_JOINED),
        });
        gateway.reload_faults().await?;
        Ok(gateway)
    }

    /// A kept decision by id: the store's, or a recent refusal before authentication (kept in
    /// memory only).
    pub async fn decision(&self, id: &str) -> Result<Option<StoredDecision>, GatewayError> {
        let recent = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .get(id)
            .cloned();
        match recent {
            Some(d) => Ok(Some(d)),
            None => Ok(self.store.decision(id).await?),
        }
    }

    /// Why the store cannot write, when the last write failed and none succeeded since.
    pub fn write_fault(&self) -> Option<String> {
        self.write_fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write_failed(&self, e: &StoreError) {
        let mut g = self.write_fault.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            tracing::error!(alert = "operator", error = %e, "the store cannot write: every door refuses temporarily (store.unavailable) until it can");
        }
        *g = Some(e.to_string());
    }

    fn write_ok(&self) {
        let mut g = self.write_fault.lock().unwrap_or_else(|e| e.into_inner());
        if g.take().is_some() {
            tracing::warn!("the store writes again");
        }
    }

    fn remember_unauthenticated(&self, record: StoredDecision) {
        let max = self.budget.limits().unauthenticated_decisions_kept;
        let mut g = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while g.order.len() >= max.max(1) {
            match g.order.pop_front() {
                Some(old) => {
                    g.by_id.remove(&old);
                }
                None => break,
            }
        }
        if max > 0 {
            g.order.push_back(record.id.clone());
            g.by_id.insert(record.id.clone(), record);
        }
    }

    /// The resource budgets (connections, buffered bodies, password hashing, log lines).
    pub fn budget(&self) -> &budget::Budget {
        &self.budget
    }

    /// Notified once per message stored by [`Gateway::accept`]: delivery workers wait on it
    /// instead of polling.
    pub fn accepted_signal(&self) -> Arc<tokio::sync::Notify> {
        self.accepted.clone()
    }

    /// The failed-authentication lockout every door shares (set its policy with
    /// [`lockout::Lockout::set_policy`]).
    pub fn lockout(&self) -> &lockout::Lockout {
        &self.lockout
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The directory in force (cheap; hold it for the length of one request).
    pub fn live(&self) -> Guard<Arc<Live>> {
        self.live.load()
    }

    /// Reloads the directory if the store's generation moved; returns the generation held.
    pub async fn refresh(&self) -> Result<i64, GatewayError> {
        let held = self.live.load().generation;
        let current = self.store.generation().await?;
        if current == held {
            return Ok(held);
        }
        let snap = self.store.snapshot().await?;
        let generation = snap.generation;
        self.live.store(Arc::new(Live {
            generation,
            index: DirectoryIndex::new(&snap.directory),
        }));
        tracing::info!(generation, "directory reloaded");
        Ok(generation)
    }

    /// Reads the faults injected by `mailgate simulate` (the CLI, the admin API, any node) that
    /// are in force now from the store, and puts them in force here; returns how many. A fault
    /// whose code this binary does not know is skipped.
    pub async fn reload_faults(&self) -> Result<usize, GatewayError> {
        let stored = self.store.active_faults(now_ms() as i64).await?;
        let faults: Vec<InjectedFault> = stored
            .into_iter()
            .filter_map(|f| {
                Some(InjectedFault {
                    code: mailgate_core::catalogue::Reason::from_code(&f.code)?,
                    principal: f.principal,
                    until_ms: f.until_ms.max(0) as u64,
                })
            })
            .collect();
        let n = faults.len();
        self.faults.store(Arc::new(faults));
        Ok(n)
    }

    /// Keeps the directory and the injected faults in force ([`Gateway::reload_faults`]) up to
    /// date: reloads at once when the store announces a change
    /// ([`Store::spawn_change_listener`]: PostgreSQL, where other nodes and the CLI write) and
    /// re-checks every `interval` whatever happens, the fallback for an announcement lost while
    /// the listener was reconnecting and the only way on a store that announces nothing
    /// (SQLite). Writes this node's row (the generation in force, and `interval` as the longest
    /// a change may take to reach it) on each change and every [`nodes::HEARTBEAT`], so writers
    /// can wait until a change is live here ([`nodes::wait_until_live`]). Call
    /// [`Gateway::leave`] when the server stops; aborting the task stops the listener too.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let changed = Arc::new(tokio::sync::Notify::new());
            // Aborted with this task (dropped when it is).
            let _listener = me
                .store
                .spawn_change_listener(changed.clone())
                .map(AbortOnDrop);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut written: Option<(i64, std::time::Instant)> = None;
            let mut faults_in_force = 0;
            loop {
                // Announcements during a reload leave one permit: one more reload, not one each.
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = changed.notified() => {}
                }
                match me.reload_faults().await {
                    Ok(n) if n != faults_in_force => {
                        tracing::warn!(active = n, "injected faults (mailgate simulate) in force");
                        faults_in_force = n;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot load injected faults"),
                }
                let generation = match me.refresh().await {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "directory reload failed; keeping the last good one");
                        continue;
                    }
                };
                let due = written
                    .is_none_or(|(g, at)| g != generation || at.elapsed() >= nodes::HEARTBEAT);
                if due {
                    let row = mailgate_store::NodeState {
                        id: me.node().id.clone(),
                        host: me.node().host.clone(),
                        pid: me.node().pid,
                        generation,
                        seen_ms: now_ms() as i64,
                        interval_ms: interval.as_millis() as i64,
                    };
                    match me.store.node_seen(&row).await {
                        Ok(()) => written = Some((generation, std::time::Instant::now())),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not record this node's directory generation")
                        }
                    }
                    me.renew_node_number().await;
                }
            }
        })
    }

    /// This process as a node of the store: the node [`Gateway::join_as`] named, this process
    /// before.
    pub fn node(&self) -> &nodes::NodeIdentity {
        self.joined.get().unwrap_or(&self.node)
    }

    /// The message-id node number this node holds (the bits 10 to 15 of every message id it
    /// makes), once [`Gateway::join_as`] leased it; `None` before (ids then carry 0).
    pub fn node_number(&self) -> Option<u16> {
        let n = self.node_number.load(std::sync::atomic::Ordering::Relaxed);
        (n != NOT_JOINED).then_some(n)
    }

    /// Leases (or renews) `node`'s message-id node number until [`nodes::NODE_NUMBER_LEASE`]
    /// from now and puts it in force for the message ids this process makes.
    async fn lease_node_number(&self, node: &str) -> Result<Option<u16>, GatewayError> {
        let now = now_ms() as i64;
        let until = now.saturating_add(nodes::NODE_NUMBER_LEASE.as_millis() as i64);
        let Some(n) = self.store.lease_node_number(node, now, until).await? else {
            return Ok(None);
        };
        mailgate_store::set_message_id_node(n);
        let before = self
            .node_number
            .swap(n, std::sync::atomic::Ordering::Relaxed);
        if before != NOT_JOINED && before != n {
            tracing::warn!(
                node,
                before,
                now = n,
                "this node's message-id node number ran out (no heartbeat reached the store in time) and another node took it; its message ids carry a new number now"
            );
        }
        Ok(Some(n))
    }

    /// The heartbeat's renewal of this node's message-id node number (a node that never joined
    /// has none).
    async fn renew_node_number(&self) {
        let Some(node) = self.joined.get().map(|j| j.id.clone()) else {
            return;
        };
        match self.lease_node_number(&node).await {
            Ok(Some(_)) => {}
            Ok(None) => tracing::error!(
                node,
                "this node's message-id node number ran out and another node took it, and every other number is held: its message ids may meet another node's (the store then refuses that acceptance) until a number is free"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not renew this node's message-id node number")
            }
        }
    }

    /// Deletes this node's row (the server is stopping): writers stop waiting for it.
    pub async fn leave(&self) {
        if let Err(e) = self.store.node_gone(&self.node().id).await {
            tracing::warn!(error = %e, "could not remove this node's row");
        }
    }

    /// The injected faults in force here.
    pub fn injected_faults(&self) -> Arc<Vec<InjectedFault>> {
        self.faults.load_full()
    }

    /// Replaces the injected faults in force (the reload loop reads them from the store:
    /// [`Gateway::reload_faults`]).
    pub fn set_injected_faults(&self, faults: Vec<InjectedFault>) {
        self.faults.store(Arc::new(faults));
    }

    /// Decides a real attempt (enforcement) and keeps the decision under a new id.
    pub async fn decide(&self, door: &str, attempt: &SendAttempt) -> Result<Decided, GatewayError> {
        self.evaluate(door, attempt, Mode::Enforce).await
    }

    /// Screens an intermediate step of a send (SMTP's MAIL FROM and RCPT TO, or AUTH as
    /// `Action::Authenticate`): returns the refusal, kept under a new id like any decision, or
    /// `None` when the step may go on. An allowance is not kept: no client ever sees its id, and
    /// the send's final decision (the one [`Gateway::accept`] takes) is kept with the message.
    /// Which refusals count at a step is the engine's (the attempt's action and facts), never the
    /// door's.
    pub async fn screen(
        &self,
        door: &str,
        attempt: &SendAttempt,
    ) -> Result<Option<Decided>, GatewayError> {
        let now = now_ms();
        let decision = self.run_engine(attempt, now, Mode::Enforce).await?;
        if decision.denial().is_none() {
            return Ok(None);
        }
        self.keep_decided(door, attempt, decision, now, Mode::Enforce)
            .await
            .map(Some)
    }

    /// A send before its message is read (an HTTP door, from the request's headers): returns
    /// the refusal that no message fact can change ([`Decision::settled_denial`]: transport,
    /// credential, project, scope, delegation, the account's state), kept under a new id, or
    /// `None` when the door should read the message and [`Gateway::decide`] the send. So a
    /// request without a valid credential never makes the door buffer its body, and a refusal
    /// that the message could still change (a limit, when the sender is not known yet) is
    /// answered with the message, as the send's decision.
    pub async fn screen_before_message(
        &self,
        door: &str,
        attempt: &SendAttempt,
    ) -> Result<Option<Decided>, GatewayError> {
        let now = now_ms();
        // A settled denial never depends on usage, so the screen needs no live numbers from a
        // shared store (one read per send saved: the send's own decision reads them). Only a
        // refusal that is kept is decided again with them, so its trace shows the real numbers.
        let decision = self.engine(attempt, &self.counters, now, Mode::Enforce);
        if decision.settled_denial().is_none() {
            return Ok(None);
        }
        let decision = if self.store.shared_counters().is_some() {
            self.run_engine(attempt, now, Mode::Enforce).await?
        } else {
            decision
        };
        if decision.settled_denial().is_none() {
            return Ok(None);
        }
        self.keep_decided(door, attempt, decision, now, Mode::Enforce)
            .await
            .map(Some)
    }

    /// Explains an attempt: every check, nothing consumed. Kept under a new id.
    pub async fn explain(&self, attempt: &SendAttempt) -> Result<Decided, GatewayError> {
        self.evaluate("explain", attempt, Mode::Explain).await
    }

    /// A door's dry run of a send: decided with every fact, as [`Gateway::explain`] (nothing
    /// consumed), kept under the door's name.
    pub async fn dry_run(
        &self,
        door: &str,
        attempt: &SendAttempt,
    ) -> Result<Decided, GatewayError> {
        self.evaluate(door, attempt, Mode::Explain).await
    }

    async fn evaluate(
        &self,
        door: &str,
        attempt: &SendAttempt,
        mode: Mode,
    ) -> Result<Decided, GatewayError> {
        let now = now_ms();
        let decision = self.run_engine(attempt, now, mode).await?;
        self.keep_decided(door, attempt, decision, now, mode).await
    }

    /// The engine's decision with the usage numbers in force: this process's counters on one
    /// node; on a store whose counters every node shares, the principal's numbers in the store
    /// (only when the decision reached the limits): a send is allowed on the numbers this node
    /// saw there within a second, and a refusal, a hold and `explain` are decided with the live
    /// numbers read now, so every node refuses, and `explain` reports, with the same numbers
    /// ([`seen`] says why and what that leaves stale).
    async fn run_engine(
        &self,
        attempt: &SendAttempt,
        now: u64,
        mode: Mode,
    ) -> Result<Decision, GatewayError> {
        let first = self.engine(attempt, &self.counters, now, mode);
        let Some(shared) = self.store.shared_counters() else {
            return Ok(first);
        };
        // The engine consults the counters only where the limit checks apply (a send): AUTH, a
        // settings call or a key management call needs no read.
        let rate = mailgate_core::catalogue::Reason::LimitRate;
        let reached_limits =
            attempt.action.applies(rate) && first.checks.iter().any(|c| c.check == rate);
        let Some(principal) = first.principal.clone().filter(|_| reached_limits) else {
            return Ok(first);
        };
        // A send allowed on the numbers this node saw within a second stands until its admission
        // re-checks it atomically; anything else is decided with live numbers ([`seen`]).
        if mode == Mode::Enforce
            && let Some(usage) = self.seen.get(&principal, now)
        {
            let seen = mailgate_core::engine::UsageSnapshot {
                principal: principal.clone(),
                usage,
            };
            let decision = self.engine(attempt, &seen, now, mode);
            if decision.verdict == Verdict::Allowed {
                return Ok(decision);
            }
        }
        let usage = match shared.usage(&principal, now).await {
            Ok(u) => u,
            Err(e) => {
                self.write_failed(&e);
                return Err(e.into());
            }
        };
        self.seen.put(&principal, usage, now);
        let live = mailgate_core::engine::UsageSnapshot { principal, usage };
        Ok(self.engine(attempt, &live, now, mode))
    }

    fn engine(
        &self,
        attempt: &SendAttempt,
        counters: &dyn Counters,
        now: u64,
        mode: Mode,
    ) -> Decision {
        let live = self.live.load();
        let mut d = decide(attempt, &live.index, counters, now, mode);
        apply_injected(&mut d, &self.faults.load(), now);
        d
    }

    async fn keep_decided(
        &self,
        door: &str,
        attempt: &SendAttempt,
        decision: Decision,
        now: u64,
        mode: Mode,
    ) -> Result<Decided, GatewayError> {
        let id = new_decision_id(now);
        // The generation the engine just decided under (a reload landing in between, a few
        // microseconds, would record the newer one).
        let generation = self.live.load().generation;
        let record = record(&id, door, attempt, &decision, now, generation);
        if mode == Mode::Enforce && !authenticated(attempt, &decision) {
            // Nothing unauthenticated writes to the store: anyone who reaches a port could fill
            // it. The refusal is counted, kept in a bounded ring (its id still resolves for a
            // while) and logged at a limited rate.
            let code = decision.denial().map_or("allowed", |d| d.code.code());
            self.budget.count_refusal(door, code);
            if let Some(d) = decision.denial()
                && self.budget.log_limited("unauthenticated refusal")
            {
                tracing::info!(
                    decision_id = %id,
                    door,
                    code = d.code.code(),
                    object = %d.object_at_fault,
                    "send refused before authentication (not stored; rate-limited log)"
                );
            }
            self.remember_unauthenticated(record);
            return Ok(Decided { decision, id });
        }
        // Enforcement does not wait for the decision to be durable: an acceptance commits it
        // (group commit keeps order), and a refusal's trace is seconds from disk at worst.
        // Explanations are asked for one at a time and often from a CLI that exits at once.
        let kept = if mode == Mode::Explain {
            self.store.record_decision(&record).await
        } else {
            self.store.enqueue_decision(record).await
        };
        if let Err(e) = kept {
            self.write_failed(&e);
            return Err(e.into());
        }
        if let Some(d) = decision.denial() {
            tracing::info!(
                decision_id = %id,
                door,
                code = d.code.code(),
                object = %d.object_at_fault,
                "send refused"
            );
        }
        Ok(Decided { decision, id })
    }

    /// Accepts the message of an accepted decision: charges the counters (re-checking the limits
    /// atomically) and stores message and usage durably. On a lost race, decides again and
    /// returns the refusal.
    ///
    /// One node: this process's counters admit, and the store writes the message with its usage
    /// in one transaction. Several nodes (a store with shared counters): the store admits (one
    /// transaction, the principal locked, the engine's arithmetic); when its live numbers change
    /// the outcome, the engine decides again with them: a refusal is answered as the engine wrote
    /// it, and a changed acceptance (held now, say) is admitted in its turn.
    pub async fn accept(
        &self,
        door: &str,
        attempt: &SendAttempt,
        decided: &Decided,
        message: Message,
    ) -> Result<Accepted, GatewayError> {
        if let Some(shared) = self.store.shared_counters() {
            return self
                .accept_shared(shared, door, attempt, decided, message)
                .await;
        }
        let d = &decided.decision;
        Self::acceptable(attempt, decided)?;
        let now = now_ms();
        match commit(d, &self.counters, now)? {
            CommitOutcome::Raced(_) => {
                let again = self.decide(door, attempt).await?;
                return Ok(Accepted::Refused(Box::new(again)));
            }
            CommitOutcome::NotAccepted => {
                return Err(GatewayError::NotAccepted(decided.id.clone()));
            }
            CommitOutcome::Admitted | CommitOutcome::NothingToCount => {}
        }
        let usage = d.charge.as_ref().map(|c| {
            let tat = self.counters.usage(&c.principal, now).rate_tat_ms;
            (
                UsageEntry {
                    at_ms: now as i64,
                    recipients: c.recipients as i64,
                },
                tat.map(|t| t as i64),
            )
        });
        let (new, state) = new_message(door, decided, message, now);
        // The send is over either way, also when this future is dropped during the write (a
        // client that hung up): free its concurrency slot, or it counts until a restart.
        let slot = d.charge.as_ref().map(|c| InFlight {
            counters: &self.counters,
            principal: &c.principal,
        });
        let stored = self.store.accept_message(&new, usage).await;
        drop(slot);
        self.stored(door, decided, new.id, state, stored)
    }

    /// Only a send is ever accepted: a decision on another action (a settings read, AUTH, a key
    /// management call) allows that call, never a message.
    fn acceptable(attempt: &SendAttempt, decided: &Decided) -> Result<(), GatewayError> {
        let d = &decided.decision;
        if !d.accepted() || !d.complete || !d.action.is_send() || !attempt.action.is_send() {
            return Err(GatewayError::NotAccepted(decided.id.clone()));
        }
        Ok(())
    }

    async fn accept_shared(
        &self,
        shared: &dyn mailgate_store::CounterStore,
        door: &str,
        attempt: &SendAttempt,
        decided: &Decided,
        message: Message,
    ) -> Result<Accepted, GatewayError> {
        // Both steps at once when the store can: a send no limit holds, admitted and its message
        // stored in one durable transaction. Given back when its principal's live numbers are
        // past what its batch could take at once: then admitted in its turn, below.
        let mut message = message;
        let d = &decided.decision;
        if let Some(charge) = d.charge.as_ref().filter(|_| d.holds.is_empty()) {
            Self::acceptable(attempt, decided)?;
            let now = now_ms();
            let (new, state) = new_message(door, decided, message, now);
            let id = new.id.clone();
            match shared
                .admit_and_store(charge, now, &self.slot_holder(), new)
                .await
            {
                Ok(mailgate_store::AdmitStored::Stored(usage)) => {
                    self.seen.put(&charge.principal, usage, now);
                    return self.stored(door, decided, id, state, Ok(()));
                }
                Ok(mailgate_store::AdmitStored::TwoSteps(new)) => {
                    let new = *new;
                    message = Message {
                        envelope_from: new.envelope_from,
                        recipients: new.recipients,
                        raw: new.raw,
                    };
                }
                Err(e) => {
                    self.write_failed(&e);
                    return Err(e.into());
                }
            }
        }
        let mut decided = std::borrow::Cow::Borrowed(decided);
        for _ in 0..ADMISSION_ROUNDS {
            Self::acceptable(attempt, &decided)?;
            let now = now_ms();
            let d = &decided.decision;
            let Some(charge) = &d.charge else {
                // Nothing to count (no principal identified).
                let (new, state) = new_message(door, &decided, message, now);
                let stored = self.store.accept_message(&new, None).await;
                return self.stored(door, &decided, new.id, state, stored);
            };
            let held: Vec<_> = d.holds.iter().map(|h| h.name).collect();
            let admitted = shared
                .admit(
                    charge,
                    &held,
                    now,
                    &self.slot_holder(),
                    now.saturating_add(SEND_SLOT_MS),
                )
                .await;
            match admitted {
                Ok(mailgate_store::Admitted::Recorded(slot, usage)) => {
                    self.seen.put(&charge.principal, usage, now);
                    let (new, state) = new_message(door, &decided, message, now);
                    let stored = self.store.accept_admitted(&new, slot).await;
                    return self.stored(door, &decided, new.id, state, stored);
                }
                Ok(mailgate_store::Admitted::Changed(usage)) => {
                    self.seen.put(&charge.principal, usage, now);
                    // The engine decides again with the numbers the store saw.
                    let live = mailgate_core::engine::UsageSnapshot {
                        principal: charge.principal.clone(),
                        usage,
                    };
                    let again = self.engine(attempt, &live, now, Mode::Enforce);
                    let again = self
                        .keep_decided(door, attempt, again, now, Mode::Enforce)
                        .await?;
                    if !again.decision.accepted() {
                        return Ok(Accepted::Refused(Box::new(again)));
                    }
                    decided = std::borrow::Cow::Owned(again);
                }
                Err(e) => {
                    self.write_failed(&e);
                    return Err(e.into());
                }
            }
        }
        // Other nodes kept moving this principal's numbers under every re-decision: a temporary
        // refusal (busy), nothing charged.
        Err(StoreError::Busy(format!(
            "the usage of {} kept changing on other nodes ({ADMISSION_ROUNDS} decisions)",
            decided.decision.principal.as_deref().unwrap_or("?")
        ))
        .into())
    }

    /// Who holds this node's concurrent-send slots: `<node>/<run>` once [`Gateway::join_as`]
    /// named the node, this process's identity before.
    fn slot_holder(&self) -> String {
        self.slot_holder
            .get()
            .cloned()
            .unwrap_or_else(|| format!("{}/-", self.node.id.replace('/', "-")))
    }

    /// Names this process as node `node` of the store (`[node] id`): its concurrent-send slots
    /// are held as `<node>/<run>`, and those an earlier run of the same node still held (it was
    /// killed) are freed at once instead of at their deadline. Leases the node's message-id node
    /// number ([`Gateway::node_number`]; the number an earlier run of `node` held, else a free
    /// one), renewed by the reloader's heartbeat, so no two running nodes make the same message
    /// id; [`GatewayError::NodeNumbersTaken`] when other running nodes hold all 64. Returns the
    /// slots freed. Call before serving.
    pub async fn join_as(&self, node: &str) -> Result<u64, GatewayError> {
        if self.lease_node_number(node).await?.is_none() {
            return Err(GatewayError::NodeNumbersTaken(node.to_owned()));
        }
        let run = mailgate_auth::random_token::<6>().unwrap_or_else(|_| now_ms().to_string());
        let _ = self.slot_holder.set(format!("{node}/{run}"));
        let _ = self.joined.set(nodes::NodeIdentity::named(node));
        match self.store.shared_counters() {
            Some(shared) => Ok(shared.release_node(node).await?),
            None => Ok(0),
        }
    }

    fn stored(
        &self,
        door: &str,
        decided: &Decided,
        message_id: String,
        state: MessageState,
        stored: Result<(), StoreError>,
    ) -> Result<Accepted, GatewayError> {
        if let Err(e) = stored {
            self.write_failed(&e);
            return Err(e.into());
        }
        self.write_ok();
        self.accepted.notify_one();
        tracing::info!(decision_id = %decided.id, message_id = %message_id, door, state = state.as_str(), "message accepted");
        Ok(Accepted::Stored { message_id, state })
    }
}

/// A send's slot in this process's counters, freed when dropped.
struct InFlight<'a> {
    counters: &'a MemoryCounters,
    principal: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counters.release(self.principal);
    }
}

/// How many times a send is decided again when other nodes' sends change its principal's
/// numbers between the decision and the admission.
const ADMISSION_ROUNDS: usize = 8;

/// How long a concurrent-send slot counts when its node dies before freeing it.
const SEND_SLOT_MS: u64 = 60_000;

/// The message an accepted decision stores, and its state.
fn new_message(
    door: &str,
    decided: &Decided,
    message: Message,
    now: u64,
) -> (NewMessage, MessageState) {
    let d = &decided.decision;
    let held = d.verdict == Verdict::Held;
    let hold_until = d
        .holds
        .iter()
        .filter_map(|h| h.reset_at_ms)
        .max()
        .map(|ms| ms as i64);
    let state = if held {
        MessageState::Held
    } else {
        MessageState::Queued
    };
    (
        NewMessage {
            id: new_message_id(now),
            decision_id: decided.id.clone(),
            accepted_at_ms: now as i64,
            door: door.to_owned(),
            principal: d.principal.clone().unwrap_or_default(),
            envelope_from: message.envelope_from,
            recipients: message.recipients,
            raw: message.raw,
            state,
            hold_until_ms: hold_until.filter(|_| held),
        },
        state,
    )
}

/// Loads usage counters from the store (the last 24 h of accepted sends and the rate states).
pub async fn load_counters(store: &dyn Store, now_ms: u64) -> Result<MemoryCounters, StoreError> {
    let counters = MemoryCounters::new();
    let since = now_ms.saturating_sub(mailgate_core::engine::counters::DAY_MS) as i64;
    let replay = store.usage_since(since).await?;
    for (principal, e) in replay.sends {
        counters.preload(
            &principal,
            e.at_ms.max(0) as u64,
            1,
            e.recipients.max(0) as u64,
        );
    }
    for (principal, tat) in replay.rate_tat_ms {
        counters.set_rate_and_in_flight(&principal, Some(tat.max(0) as u64), 0);
    }
    Ok(counters)
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A time-ordered 128-bit id (48-bit ms timestamp, 80 random bits) in Crockford base32, like a
/// ULID: sortable, unique across nodes, and safe to show.
pub fn new_decision_id(now_ms: u64) -> String {
    let random: [u8; 10] = mailgate_auth::random_bytes().unwrap_or([0; 10]);
    let mut v: u128 = u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80;
    for (i, b) in random.iter().enumerate() {
        v |= u128::from(*b) << (8 * (9 - i));
    }
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (25 - i);
        let idx = ((v >> shift) & 0x1F) as usize;
        *slot = CROCKFORD.get(idx).copied().unwrap_or(b'0');
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub use mailgate_store::new_message_id;

/// The documented JSON shape of a decision:
/// `{"allowed", "verdict", "decision_id", "denial", "denials", "checks": [{"check","code","outcome","detail","remedy"}]}`.
/// The same document is what the store keeps (see `trace.rs`).
pub fn decision_json(decision: &Decision, decision_id: &str) -> Value {
    serde_json::to_value(trace::DecisionView {
        decision,
        id: decision_id,
    })
    .unwrap_or_else(|e| json!({"decision_id": decision_id, "error": e.to_string()}))
}

fn record(
    id: &str,
    door: &str,
    attempt: &SendAttempt,
    decision: &Decision,
    now_ms: u64,
    generation: i64,
) -> StoredDecision {
    let verdict = match decision.verdict {
        Verdict::Allowed => StoredVerdict::Allowed,
        Verdict::Held => StoredVerdict::Held,
        Verdict::Denied => StoredVerdict::Denied,
    };
    let pending = decision
        .checks
        .iter()
        .any(|c| c.outcome == Outcome::Pending);
    // Explain without a fact (no --ip): not "allowed" on the record either.
    let not_checked = decision
        .checks
        .iter()
        .any(|c| c.outcome == Outcome::NotChecked);
    StoredDecision {
        id: id.to_owned(),
        at_ms: now_ms as i64,
        door: door.to_owned(),
        principal: decision.principal.clone().unwrap_or_default(),
        verdict: if verdict == StoredVerdict::Denied {
            verdict
        } else if not_checked {
            StoredVerdict::NotChecked
        } else if pending {
            StoredVerdict::Pending
        } else {
            verdict
        },
        code: decision.denial().map(|d| d.code.code().to_owned()),
        body: serde_json::to_vec(&trace::StoredView {
            attempt,
            decision: trace::DecisionView { decision, id },
            generation,
        })
        .map(TraceJson)
        // Cannot happen (string keys only); the decision is still kept, with the reason.
        .unwrap_or_else(|e| TraceJson::from(json!({"error": e.to_string()}))),
    }
}

/// Whether an attempt came with a credential the door verified (a matching secret, a valid
/// token, a login whose password matched, or a relay client from an allowed address). Only
/// those decisions are stored.
fn authenticated(attempt: &SendAttempt, decision: &Decision) -> bool {
    use mailgate_core::engine::Credential;
    match attempt.credential {
        Credential::None | Credential::Refused { .. } => false,
        Credential::RelayIp => !decision
            .denials
            .iter()
            .any(|d| d.code.code() == "relay.ip_not_allowed"),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    /// The `Value`-tree implementation the views replaced (kept to prove they agree).
    fn reference_decision_json(decision: &Decision, decision_id: &str) -> Value {
        let checks: Vec<Value> = decision
            .checks
            .iter()
            .map(|c| {
                let mut v = json!({
                    "check": c.stage.as_str(),
                    "code": c.code(),
                    "outcome": c.outcome,
                    "detail": c.detail,
                    "remedy": c.remedy(),
                });
                if let (Some(obj), Some(f)) = (v.as_object_mut(), c.object_at_fault()) {
                    obj.insert("object_at_fault".into(), json!(f.to_string()));
                    if let Some(l) = c.limit() {
                        obj.insert("limit".into(), json!(l));
                    }
                }
                v
            })
            .collect();
        let denial = |d: &mailgate_core::engine::Denial| {
            json!({
                "code": d.code.code(),
                "check": d.stage.as_str(),
                "object_at_fault": d.object_at_fault.to_string(),
                "message": d.message,
                "remedy": d.remedy,
                "limit": d.limit,
            })
        };
        json!({
            "allowed": decision.accepted(),
            "verdict": decision.verdict,
            "complete": decision.complete,
            "decision_id": decision_id,
            "denial": decision.denial().map(denial),
            "denials": decision.denials.iter().map(denial).collect::<Vec<_>>(),
            "holds": decision.holds,
            "rewrites": decision.rewrites,
            "checks": checks,
        })
    }

    use super::*;
    use mailgate_core::engine::{Credential, Door};
    use mailgate_core::orgfile::OrgFile;
    use mailgate_store::{Changeset, Store};

    const ORG: &str = "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n    limits: {messages_per_day: 1}\n";

    async fn gateway() -> (Arc<Gateway>, Arc<dyn Store>) {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        let dir = OrgFile::parse(ORG).unwrap().directory;
        store
            .commit(0, &Changeset::between(&Default::default(), &dir), "t")
            .await
            .unwrap();
        (Gateway::open(store.clone()).await.unwrap(), store)
    }

    fn attempt() -> SendAttempt {
        SendAttempt::new(
            Door::Smtp,
            Credential::SmtpLogin {
                user: "a@example.com".into(),
            },
        )
        .from("a@example.com")
        .to(["b@example.org"])
        .parsed(10)
    }

    fn msg() -> Message {
        Message {
            envelope_from: "a@example.com".into(),
            recipients: vec!["b@example.org".into()],
            raw: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        }
    }

    #[tokio::test]
    async fn accept_stores_the_message_and_counts_it_across_restarts() {
        let (gw, store) = gateway().await;
        let d = gw.decide("smtp", &attempt()).await.unwrap();
        assert!(d.decision.accepted());
        let Accepted::Stored { message_id, state } =
            gw.accept("smtp", &attempt(), &d, msg()).await.unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(state, MessageState::Queued);
        let m = store.message(&message_id).await.unwrap().unwrap();
        assert_eq!(m.decision_id, d.id);
        assert_eq!(m.recipients, vec!["b@example.org".to_owned()]);

        // The daily limit of 1 is used up, also for a gateway opened afresh on the same store.
        let second = gw.decide("smtp", &attempt()).await.unwrap();
        assert_eq!(
            second.decision.denial().unwrap().code.code(),
            "limit.daily_messages"
        );
        let restarted = Gateway::open(store.clone()).await.unwrap();
        let third = restarted.decide("smtp", &attempt()).await.unwrap();
        assert_eq!(
            third.decision.denial().unwrap().code.code(),
            "limit.daily_messages"
        );
        // Every decision resolves by id.
        assert!(store.decision(&third.id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_abandoned_acceptance_frees_its_concurrent_send_slot() {
        let (gw, _store) = gateway().await;
        let d = gw.decide("smtp", &attempt()).await.unwrap();
        // Polled once (the message write under way), then dropped: a client that hung up.
        let _ = tokio::time::timeout(
            std::time::Duration::ZERO,
            gw.accept("smtp", &attempt(), &d, msg()),
        )
        .await;
        assert_eq!(gw.counters.usage("a@example.com", now_ms()).in_flight, 0);
    }

    #[tokio::test]
    async fn screening_keeps_refusals_only_and_consumes_nothing() {
        let (gw, store) = gateway().await;
        // Allowed: nothing kept, nothing counted (the daily limit of 1 is still there).
        assert!(gw.screen("smtp", &attempt()).await.unwrap().is_none());
        assert!(gw.screen("smtp", &attempt()).await.unwrap().is_none());
        let d = gw.decide("smtp", &attempt()).await.unwrap();
        assert!(matches!(
            gw.accept("smtp", &attempt(), &d, msg()).await.unwrap(),
            Accepted::Stored { .. }
        ));
        // Refused: the refusal is kept under its id.
        let refused = gw.screen("smtp", &attempt()).await.unwrap().unwrap();
        assert_eq!(
            refused.decision.denial().unwrap().code.code(),
            "limit.daily_messages"
        );
        let kept = store.decision(&refused.id).await.unwrap().unwrap();
        assert_eq!(kept.code.as_deref(), Some("limit.daily_messages"));
    }

    #[tokio::test]
    async fn refusals_before_authentication_are_counted_not_stored() {
        let (gw, store) = gateway().await;
        let mut ids = Vec::new();
        for _ in 0..50 {
            let mut a = attempt();
            a.credential = Credential::None;
            let d = gw.decide("smtp", &a).await.unwrap();
            assert_eq!(d.decision.denial().unwrap().code.code(), "auth.missing");
            ids.push(d.id);
        }
        store.flush().await.unwrap();
        for id in &ids {
            assert!(store.decision(id).await.unwrap().is_none(), "{id} stored");
            // Still explained by id, from memory.
            let kept = gw.decision(id).await.unwrap().unwrap();
            assert_eq!(kept.code.as_deref(), Some("auth.missing"));
        }
        assert!(
            gw.budget()
                .refusal_counts()
                .contains(&("smtp".into(), "auth.missing".into(), 50))
        );
        // An authenticated refusal is stored.
        let mut a = attempt();
        a.envelope_from = Some("ceo@example.com".into());
        let d = gw.decide("smtp", &a).await.unwrap();
        store.flush().await.unwrap();
        assert!(store.decision(&d.id).await.unwrap().is_some());
    }

    /// A decision on another action than a send (a settings read, AUTH) allows that call and is
    /// never a send acceptance: nothing is stored or counted, whatever the verdict.
    #[tokio::test]
    async fn a_non_send_decision_cannot_be_accepted() {
        let (gw, _) = gateway().await;
        let auth = attempt().for_action(mailgate_core::engine::Action::Authenticate);
        let d = gw.decide("smtp", &auth).await.unwrap();
        assert!(d.decision.accepted() && d.decision.charge.is_none());
        assert!(matches!(
            gw.accept("smtp", &auth, &d, msg()).await,
            Err(GatewayError::NotAccepted(_))
        ));
        // The daily limit of 1 is untouched: the send that follows is allowed and stored.
        let send = gw.decide("smtp", &attempt()).await.unwrap();
        assert!(matches!(
            gw.accept("smtp", &attempt(), &send, msg()).await.unwrap(),
            Accepted::Stored { .. }
        ));
    }

    /// Before its message, a send is refused only for what the message cannot change: a used-up
    /// limit waits for the message (its sender's checks come first), a refused credential does
    /// not.
    #[tokio::test]
    async fn screening_before_the_message_answers_settled_refusals_only() {
        let (gw, _) = gateway().await;
        let mut early = attempt();
        early.envelope_from = None;
        early.header = None;
        early.recipients = None;
        early.size = None;
        early.body = mailgate_core::engine::Body::Unknown;
        let d = gw.decide("smtp", &attempt()).await.unwrap();
        gw.accept("smtp", &attempt(), &d, msg()).await.unwrap();
        assert!(gw.screen("smtp", &early).await.unwrap().is_some());
        assert!(
            gw.screen_before_message("smtp", &early)
                .await
                .unwrap()
                .is_none()
        );
        early.credential = Credential::None;
        let refused = gw
            .screen_before_message("smtp", &early)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            refused.decision.denial().unwrap().code.code(),
            "auth.missing"
        );
    }

    #[tokio::test]
    async fn a_denial_cannot_be_accepted() {
        let (gw, _) = gateway().await;
        let mut a = attempt();
        a.envelope_from = Some("ceo@example.com".into());
        let d = gw.decide("smtp", &a).await.unwrap();
        assert!(!d.decision.accepted());
        assert!(matches!(
            gw.accept("smtp", &a, &d, msg()).await,
            Err(GatewayError::NotAccepted(_))
        ));
    }

    /// The trace written straight from the engine's types (`trace.rs`) is, key for key and in
    /// order, the document the `Value`-tree code built: allowed, denied with a limit, denied as
    /// unowned sender, explained with several denials, and stored the same as served.
    #[tokio::test]
    async fn traces_are_the_documented_shape_whatever_the_decision() {
        let (gw, store) = gateway().await;
        let allowed = gw.decide("smtp", &attempt()).await.unwrap();
        gw.accept("smtp", &attempt(), &allowed, msg())
            .await
            .unwrap();
        let limited = gw.decide("smtp", &attempt()).await.unwrap();
        let mut unowned = attempt();
        unowned.envelope_from = Some("ceo@example.com".into());
        let unowned = gw.decide("smtp", &unowned).await.unwrap();
        let mut many = attempt();
        many.envelope_from = Some("ceo@example.com".into());
        let explained = gw.explain(&many).await.unwrap();
        assert!(
            explained.decision.denials.len() >= 2,
            "{:?}",
            explained.decision.denials
        );
        for d in [&allowed, &limited, &unowned, &explained] {
            let expected = reference_decision_json(&d.decision, &d.id);
            let served = decision_json(&d.decision, &d.id);
            assert_eq!(
                serde_json::to_string(&served).unwrap(),
                serde_json::to_string(&expected).unwrap(),
                "{}",
                d.id
            );
            let kept = store.decision(&d.id).await.unwrap().unwrap();
            let kept = kept.body.parse().unwrap();
            assert_eq!(kept["decision"], expected);
        }
    }

    #[test]
    fn ids_are_ordered() {
        assert!(new_decision_id(1) < new_decision_id(2));
        assert_eq!(new_message_id(5).len(), 16);
    }
}
