//! The delivery queue: what the delivery worker, the message-status API and the `queue` /
//! `captured` commands use. [`QueueStore`] is implemented for SQLite in `sqlite/queue.rs`; a
//! PostgreSQL store implements the same trait, leasing with `UPDATE .. WHERE id IN (SELECT .. FOR
//! UPDATE SKIP LOCKED) RETURNING ..` instead of SQLite's `BEGIN IMMEDIATE` (one writer at a time).
//!
//! Message states: `held` (a limit with `exceed_action: hold`; released at `hold_until_ms`),
//! `queued` (due now), `deferred` (some recipient waits for `next_attempt_ms`), `delivered`,
//! `failed` (every recipient is final and at least one failed), `captured` (capture mode).
//! A worker leases due messages (`lease_owner`, `lease_until_ms`); a message whose lease expired
//! is due again, so a crashed worker's messages are picked up by the next one. Leases are owned
//! per node: `serve` names its workers' leases [`lease_owner`]`(node, run, worker)`, and a node
//! that starts again takes back its own leases at once ([`QueueStore::reclaim_leases`]) instead
//! of waiting for them to expire.

use async_trait::async_trait;
use serde::Serialize;

use crate::{MessageState, NewMessage, RecipientState, StoreError};

/// A message leased to a worker, with the recipients still to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedMessage {
    /// Message id.
    pub id: String,
    /// The accepting decision.
    pub decision_id: String,
    /// Which door accepted it (`dsn` for bounces Mailgate made).
    pub door: String,
    /// When accepted (Unix ms): the maximum age counts from here.
    pub accepted_at_ms: i64,
    /// Envelope sender (empty: the null sender of a bounce).
    pub envelope_from: String,
    /// Recipients not yet final, with their state.
    pub recipients: Vec<(String, RecipientState)>,
    /// Attempts so far (whole-message).
    pub attempts: i64,
    /// The message.
    pub raw: Vec<u8>,
    /// The lease runs until then (Unix ms).
    pub lease_until_ms: i64,
    /// The lease's token (its epoch): every write-back under this lease passes it
    /// ([`AttemptReport::lease`], [`QueueStore::mark_captured`], [`QueueStore::extend_lease`]),
    /// and changes nothing once the lease is over, even for the same owner name.
    pub lease: i64,
    /// The lease before this one ended without a recorded outcome (its holder died, was paused
    /// past it, or its node took it back at start): that holder may have delivered the message,
    /// so this delivery may be a second one. The attempt recorded under this lease says so in
    /// the history ([`AttemptEntry::possible_duplicate`]).
    pub possible_duplicate: bool,
}

/// The outcome of one attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    /// The recipient.
    pub recipient: String,
    /// Delivered, deferred or failed.
    pub state: RecipientState,
    /// Reason code (`upstream.refused`, `upstream.deferred`, `upstream.auth_failed`).
    pub code: Option<String>,
    /// The upstream's reply, verbatim (or what went wrong on the way, e.g. connection refused).
    pub reply: Option<String>,
}

/// What one delivery attempt of one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    /// Message id.
    pub message_id: String,
    /// The token of the lease the attempt was made under ([`LeasedMessage::lease`]).
    pub lease: i64,
    /// When (Unix ms).
    pub at_ms: i64,
    /// The smarthost tried (by name), if one was.
    pub smarthost: Option<String>,
    /// Per-recipient outcomes (recipients not named stay as they were).
    pub outcomes: Vec<RecipientOutcome>,
    /// When to try again if any recipient is still not final.
    pub next_attempt_ms: Option<i64>,
    /// A delivery status notification to queue in the same transaction (bounce to the sender).
    pub dsn: Option<NewMessage>,
}

/// What [`QueueStore::record_attempt`] (and the other write-backs under a lease) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded; the message is now in this state.
    State(MessageState),
    /// The lease was lost (expired and taken by another worker, taken back by its node at start,
    /// or the message was deleted): nothing was recorded, zero rows changed.
    LeaseLost,
}

/// What [`QueueStore::retry_message`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Due now.
    Requeued,
    /// No such message.
    NotFound,
    /// Nothing to retry: every recipient was delivered (or the message was captured).
    Final(MessageState),
}

/// One line of the queue listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueEntry {
    /// Message id.
    pub id: String,
    /// State.
    pub state: MessageState,
    /// When accepted (Unix ms).
    pub accepted_at_ms: i64,
    /// Envelope sender.
    pub envelope_from: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Size in bytes.
    pub size: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// Next attempt (Unix ms), when waiting.
    pub next_attempt_ms: Option<i64>,
    /// The accepting decision.
    pub decision_id: String,
}

/// Which messages [`QueueStore::list_queue`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueFilter {
    /// Only this state (`None`: every state but `captured`).
    pub state: Option<MessageState>,
    /// At most this many, newest first (0 means 100).
    pub limit: u32,
}

/// A recipient's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipientStatus {
    /// The recipient.
    pub recipient: String,
    /// Its state.
    pub state: RecipientState,
    /// Attempts for it.
    pub attempts: i64,
    /// Reason code of the last outcome.
    pub code: Option<String>,
    /// The upstream's last reply, verbatim.
    pub last_reply: Option<String>,
    /// The smarthost of the last attempt.
    pub smarthost: Option<String>,
}

/// One attempt for one recipient, as kept in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptEntry {
    /// When (Unix ms).
    pub at_ms: i64,
    /// Smarthost.
    pub smarthost: Option<String>,
    /// Recipient.
    pub recipient: String,
    /// Delivered, deferred or failed.
    pub outcome: RecipientState,
    /// Reason code.
    pub code: Option<String>,
    /// Upstream reply, verbatim.
    pub reply: Option<String>,
    /// The next attempt this outcome scheduled.
    pub next_attempt_ms: Option<i64>,
    /// This attempt followed a lease that ended without a recorded outcome: the message may
    /// have been delivered twice (see [`LeasedMessage::possible_duplicate`]).
    pub possible_duplicate: bool,
}

/// Everything known about one message's delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageStatus {
    /// The summary.
    #[serde(flatten)]
    pub entry: QueueEntry,
    /// Which door accepted it.
    pub door: String,
    /// Who sent it (counter key).
    pub principal: String,
    /// Held until (Unix ms).
    pub hold_until_ms: Option<i64>,
    /// Worker holding a lease, while one does.
    pub lease_owner: Option<String>,
    /// Lease expiry.
    pub lease_until_ms: Option<i64>,
    /// When it became final (delivered, failed, captured).
    pub done_at_ms: Option<i64>,
    /// Per recipient (the envelope's recipients before the first attempt: all `pending`).
    pub recipient_status: Vec<RecipientStatus>,
    /// Some attempt in the history is marked `possible_duplicate`.
    pub possible_duplicate: bool,
    /// Every attempt, oldest first.
    pub history: Vec<AttemptEntry>,
}

/// A captured message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedMessage {
    /// Message id.
    pub id: String,
    /// The accepting decision.
    pub decision_id: String,
    /// When accepted (Unix ms).
    pub accepted_at_ms: i64,
    /// When captured (Unix ms).
    pub captured_at_ms: Option<i64>,
    /// Envelope sender.
    pub envelope_from: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Size in bytes.
    pub size: i64,
    /// The message: whole from [`QueueStore::captured_message`], its first
    /// [`CAPTURED_HEAD_BYTES`] bytes (enough for the header) from [`QueueStore::list_captured`].
    pub raw: Vec<u8>,
}

/// How much of each message [`QueueStore::list_captured`] returns.
pub const CAPTURED_HEAD_BYTES: i64 = 64 * 1024;

/// The lease owner name of delivery worker `worker` in one run of node `node` (a process start,
/// `run` random per start): `<node>/<run>/<worker>`. The node part is what
/// [`QueueStore::reclaim_leases`] matches; the run part keeps the owner of every lease unique
/// across restarts, so a write-back from an earlier run of the same node never matches a lease
/// taken since (write-backs are fenced by owner). `node` holds no `/`.
pub fn lease_owner(node: &str, run: &str, worker: u32) -> String {
    format!("{node}/{run}/{worker}")
}

/// The unexpired delivery leases one node holds ([`QueueStore::leases_by_node`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeLeases {
    /// The node: the `<node>` part of the lease owners `<node>/<run>/<worker>` (see
    /// [`lease_owner`]; an owner without `/` is a node of its own).
    pub node: String,
    /// Messages it holds a lease on that has not expired.
    pub leases: u64,
}

/// Counts leases per owner into leases per node, by node name.
pub(crate) fn leases_per_node(per_owner: Vec<(String, i64)>) -> Vec<NodeLeases> {
    let mut nodes = std::collections::BTreeMap::<String, u64>::new();
    for (owner, n) in per_owner {
        let node = owner.split('/').next().unwrap_or_default().to_owned();
        *nodes.entry(node).or_default() += u64::try_from(n).unwrap_or(0);
    }
    nodes
        .into_iter()
        .map(|(node, leases)| NodeLeases { node, leases })
        .collect()
}

/// The queue operations (delivery worker, status API, CLI).
#[async_trait]
pub trait QueueStore: Send + Sync {
    /// Moves `held` messages whose `hold_until_ms` has passed to `queued`; returns how many.
    async fn release_held(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Leases up to `limit` due messages to `owner` until `now_ms + lease_ms`. Due: `queued` or
    /// `deferred` with `next_attempt_ms <= now_ms`, and no lease or an expired one.
    async fn lease_due(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<LeasedMessage>, StoreError>;

    /// Takes back every lease of node `node`: each message leased by an owner named
    /// `<node>/...` (see [`lease_owner`]) has its lease ended, so it is due at once (a deferred
    /// message keeps its `next_attempt_ms`, already past when it was leased). A node calls it
    /// when it starts, before its delivery workers run: none of its earlier workers runs any
    /// more, so their messages need not wait for `relay.lease_ms`. A write-back under a lease
    /// taken back changes nothing (as under a lost lease), and leases of other nodes (`node10`
    /// is not `node1`) are untouched. Returns how many messages were released.
    async fn reclaim_leases(&self, node: &str, now_ms: i64) -> Result<u64, StoreError>;

    /// Ends the leases of messages this process's acceptances leased to its own delivery
    /// workers that no worker has taken yet (a node shutting down, after its listeners
    /// stopped): they are due at once for the other nodes rather than after `relay.lease_ms`,
    /// and not marked as possible duplicates (nobody attempted them). Returns how many. A store
    /// that hands nothing off (SQLite) has none.
    async fn release_handed_off(&self, _now_ms: i64) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The earliest time something becomes due (`queued` now, `deferred` and `held` later), for a
    /// worker deciding how long to sleep.
    async fn next_due_ms(&self) -> Result<Option<i64>, StoreError>;

    /// Extends the leases `leases` (message id, lease token) of `owner` to `now_ms + lease_ms`,
    /// for a worker whose delivery runs long. Fenced as every write-back: a lease that is over
    /// (taken by another, taken back, recorded, the message deleted) is not extended. Returns one
    /// outcome per lease, in order: [`Recorded::State`] with the message's state when extended,
    /// [`Recorded::LeaseLost`] when not.
    async fn extend_lease(
        &self,
        owner: &str,
        leases: &[(String, i64)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Recorded>, StoreError>;

    /// Tells the other nodes sharing this queue that messages were accepted (`from`: this
    /// node's id), so their delivery workers look now rather than at their next poll. One call
    /// per burst of acceptances, never inside an acceptance's transaction. A store only one
    /// node uses (SQLite) does nothing.
    async fn wake_others(&self, _from: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Starts listening for other nodes' [`QueueStore::wake_others`]: `wake` is notified on
    /// each (not on node `node`'s own), and once after a lost connection is re-established
    /// (what was announced meanwhile is lost; the workers' polling is the fallback). `None`
    /// when the store has no other nodes (SQLite).
    fn spawn_wakeup_listener(
        &self,
        _node: &str,
        _wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }

    /// Records an attempt's per-recipient outcomes, ends the lease and sets the message state
    /// (with an optional DSN queued in the same transaction). Only the lease holder may record:
    /// `owner` holding the lease [`AttemptReport::lease`] still; otherwise nothing changes and
    /// the answer is [`Recorded::LeaseLost`].
    async fn record_attempt(
        &self,
        owner: &str,
        report: &AttemptReport,
    ) -> Result<Recorded, StoreError>;

    /// Records several attempts (one worker's batch) at once, as [`QueueStore::record_attempt`]
    /// each; one transaction where the store can. Returns one outcome per report, in order.
    async fn record_attempts(
        &self,
        owner: &str,
        reports: &[AttemptReport],
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut out = Vec::with_capacity(reports.len());
        for r in reports {
            out.push(self.record_attempt(owner, r).await?);
        }
        Ok(out)
    }

    /// Capture mode: marks a leased message `captured` instead of relaying it (fenced by the
    /// lease `lease` as [`QueueStore::record_attempt`]).
    async fn mark_captured(
        &self,
        owner: &str,
        id: &str,
        lease: i64,
        now_ms: i64,
    ) -> Result<Recorded, StoreError>;

    /// Lists messages (newest first).
    async fn list_queue(&self, filter: &QueueFilter) -> Result<Vec<QueueEntry>, StoreError>;

    /// One message's delivery status.
    async fn message_status(&self, id: &str) -> Result<Option<MessageStatus>, StoreError>;

    /// Makes a message due now (deferred, queued or held; failed recipients are tried again).
    async fn retry_message(&self, id: &str, now_ms: i64) -> Result<RetryOutcome, StoreError>;

    /// Deletes a message with its delivery history; false when there was none.
    async fn delete_message(&self, id: &str) -> Result<bool, StoreError>;

    /// Captured messages, newest first, each with the head of its raw message.
    async fn list_captured(&self, limit: u32) -> Result<Vec<CapturedMessage>, StoreError>;

    /// One captured message, whole.
    async fn captured_message(&self, id: &str) -> Result<Option<CapturedMessage>, StoreError>;

    /// The delivery leases in force at `now_ms` (not expired, on messages waiting for
    /// delivery), counted per node, by node name (`mailgate status`, `GET /mailgate/v1/status`).
    async fn leases_by_node(&self, now_ms: i64) -> Result<Vec<NodeLeases>, StoreError>;
}
