//! The directory store: the directory (objects and a generation, optimistic concurrency),
//! running nodes, admin tokens, decisions by id, usage, accepted messages and retention. The trait
//! every backend implements; the types it speaks.

use async_trait::async_trait;
use mailgate_core::directory::{Directory, Kind, Object};

use crate::{
    AuditAction, CounterStore, FaultStore, MessageState, SendSlot, StoreError, StoredVerdict,
};

/// A directory with the generation it was read at.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The directory.
    pub directory: Directory,
    /// Increases by one with every committed change.
    pub generation: i64,
}

/// One change to the directory, as computed by `apply` or an imperative command.
#[derive(Debug, Clone, Default)]
pub struct Changeset {
    /// Objects to create or replace.
    pub upserts: Vec<Object>,
    /// Objects to remove.
    pub deletes: Vec<(Kind, String)>,
}

impl Changeset {
    /// Computes the changes that turn `from` into `to`.
    pub fn between(from: &Directory, to: &Directory) -> Changeset {
        let old = from.to_objects();
        let new = to.to_objects();
        let mut cs = Changeset::default();
        for o in &new {
            let same = old
                .iter()
                .any(|p| p.kind == o.kind && p.id == o.id && p.body == o.body);
            if !same {
                cs.upserts.push(o.clone());
            }
        }
        for o in &old {
            if !new.iter().any(|n| n.kind == o.kind && n.id == o.id) {
                cs.deletes.push((o.kind, o.id.clone()));
            }
        }
        cs
    }

    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// A stored decision: the summary columns plus the full JSON body (the decision and its trace).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDecision {
    /// The decision id (`01J...`).
    pub id: String,
    /// When it was made (Unix ms).
    pub at_ms: i64,
    /// Which door asked (`gmail`, `sendgrid`, `smtp`, `explain`, ...).
    pub door: String,
    /// Who asked (principal key).
    pub principal: String,
    /// What it concluded.
    pub verdict: StoredVerdict,
    /// Reason code of a denial.
    pub code: Option<String>,
    /// The decision as JSON.
    pub body: TraceJson,
}

/// One line of the directory's audit log: one object changed by one committed change. Never a
/// secret: the object's body is not kept here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// When the change was committed (Unix seconds).
    pub at_secs: i64,
    /// Who made it (`cli:<user>`, `admin-api:<token name>`, `sendgrid-api:<key id>`, ...).
    pub actor: String,
    /// What it did to the object.
    pub action: AuditAction,
    /// The object's kind.
    pub kind: Kind,
    /// The object's id (an address, a key id, a domain, ...).
    pub id: String,
    /// The directory generation the change made.
    pub generation: i64,
}

/// A stored decision without its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionSummary {
    /// The decision id.
    pub id: String,
    /// When it was made (Unix ms).
    pub at_ms: i64,
    /// Which door asked.
    pub door: String,
    /// Who asked (principal key).
    pub principal: String,
    /// Reason code of a denial.
    pub code: Option<String>,
}

/// A decision's trace as JSON text: written once by the gateway (straight from the engine's
/// types), stored packed, and parsed only by whoever reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceJson(pub Vec<u8>);

impl TraceJson {
    /// The JSON text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses it.
    pub fn parse(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }
}

impl From<serde_json::Value> for TraceJson {
    fn from(v: serde_json::Value) -> Self {
        TraceJson(v.to_string().into_bytes())
    }
}

/// One accepted send, as the usage counters record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageEntry {
    /// When it was accepted (Unix ms).
    pub at_ms: i64,
    /// How many recipients it had.
    pub recipients: i64,
}

/// Usage to replay into in-memory counters at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageReplay {
    /// Accepted sends of the last 24 h, per principal, oldest first.
    pub sends: Vec<(String, UsageEntry)>,
    /// GCRA theoretical arrival times per principal.
    pub rate_tat_ms: Vec<(String, i64)>,
}

/// An accepted message, as the doors hand it to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Message id (also the Gmail door's `id`).
    pub id: String,
    /// The decision that accepted it.
    pub decision_id: String,
    /// When (Unix ms).
    pub accepted_at_ms: i64,
    /// Which door.
    pub door: String,
    /// Counter key of the sender.
    pub principal: String,
    /// SMTP envelope sender.
    pub envelope_from: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// The RFC 5322 message as sent on.
    pub raw: Vec<u8>,
    /// [`MessageState::Queued`] or [`MessageState::Held`].
    pub state: MessageState,
    /// For held messages: when the limit resets.
    pub hold_until_ms: Option<i64>,
}

/// A stored message's summary (no body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    /// Message id.
    pub id: String,
    /// The accepting decision.
    pub decision_id: String,
    /// State.
    pub state: MessageState,
    /// Envelope sender.
    pub envelope_from: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Size in bytes.
    pub size: i64,
    /// When accepted (Unix ms).
    pub accepted_at_ms: i64,
}

/// How many node numbers there are: a message id has 6 bits for its node.
pub const NODE_NUMBERS: u16 = 64;

/// Bits of a message id below the milliseconds: 6 for the node number, 10 for a counter.
const NODE_BITS: u32 = 6;
const COUNTER_BITS: u32 = 10;
const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;
const MS_MASK: u64 = 0xFFFF_FFFF_FFFF;

/// The message id after `last` (0 for none) on node `node` at `now_ms`, as a number: 48 bits of
/// Unix milliseconds, 6 bits of node number, 10 bits of counter. A later millisecond starts the
/// counter at 0; within one millisecond it counts up, and past 1,023 the id moves on to the next
/// millisecond (never into the node bits), so ids of one node strictly increase and two nodes
/// with different numbers never make the same id. When the node number changes, the id also
/// moves on to the next millisecond, so the ids of one process keep increasing.
pub fn message_id(now_ms: u64, node: u16, last: u64) -> u64 {
    let node = u64::from(node) & NODE_MASK;
    let ms = now_ms & MS_MASK;
    let last_ms = last >> (NODE_BITS + COUNTER_BITS);
    let last_node = (last >> COUNTER_BITS) & NODE_MASK;
    let last_counter = last & COUNTER_MAX;
    let (ms, counter) = if ms > last_ms {
        (ms, 0)
    } else if node == last_node && last_counter < COUNTER_MAX {
        (last_ms, last_counter + 1)
    } else {
        ((last_ms + 1) & MS_MASK, 0)
    };
    (ms << (NODE_BITS + COUNTER_BITS)) | (node << COUNTER_BITS) | counter
}

/// The node number in a message id made by [`message_id`] (bits 10 to 15), or `None` when `id`
/// is not 16 hex digits.
pub fn message_id_node(id: &str) -> Option<u16> {
    if id.len() != 16 {
        return None;
    }
    let v = u64::from_str_radix(id, 16).ok()?;
    Some(((v >> COUNTER_BITS) & NODE_MASK) as u16)
}

/// This process's node number, set once it has leased one ([`set_message_id_node`]).
static NODE: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// Makes this process's message ids carry node number `node` (0 to 63): the number the store
/// leased to it ([`Store::lease_node_number`]). A process that never set one uses 0: on SQLite
/// that is the one node's number; on PostgreSQL only `mailgate serve` accepts messages, and it
/// sets its leased number before it serves.
pub fn set_message_id_node(node: u16) {
    NODE.store(node % NODE_NUMBERS, std::sync::atomic::Ordering::Relaxed);
}

/// A new message id in Gmail's style: 16 lower-case hex digits, time-ordered: [`message_id`]
/// with this process's node number ([`set_message_id_node`]). Ids from one process strictly
/// increase, so they never repeat here even at thousands per millisecond, and two processes
/// holding different node numbers never draw the same id (before the node bits, two nodes'
/// 16-bit suffixes from a random start could meet in one millisecond).
pub fn new_message_id(now_ms: u64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let node = NODE.load(Ordering::Relaxed);
    let next = |last: u64| message_id(now_ms, node, last);
    let id = match LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(next(l))) {
        Ok(prev) | Err(prev) => next(prev),
    };
    format!("{id:016x}")
}

/// What [`Store::purge`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Decisions deleted.
    pub decisions: u64,
    /// Messages deleted (with their bodies and delivery history).
    pub messages: u64,
}

/// A running gateway process as the store knows it: the directory generation it has in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Unique per process run.
    pub id: String,
    /// Host name and process id (to tell a node that died without saying so).
    pub host: String,
    pub pid: u32,
    /// Directory generation in force.
    pub generation: i64,
    /// When the node last wrote this row (Unix ms).
    pub seen_ms: i64,
    /// How often the node re-checks the directory generation (ms): the longest a change can
    /// take to reach it when no announcement does ([`Store::spawn_change_listener`]).
    pub interval_ms: i64,
}

/// The storage interface every front door, the CLI and the server share. It keeps the injected
/// faults too ([`FaultStore`]), so the gateway reads them through the handle it reloads with, and
/// the failed-authentication counts and Gmail upload sessions every node shares
/// ([`crate::LockoutStore`], [`crate::UploadStore`]), and who runs a periodic job
/// ([`crate::JobStore`]), and the node numbers in message ids ([`crate::NodeNumberStore`]).
#[async_trait]
pub trait Store:
    FaultStore
    + crate::LockoutStore
    + crate::UploadStore
    + crate::JobStore
    + crate::NodeNumberStore
    + Send
    + Sync
{
    /// The usage counters every node shares, when this store serves several nodes (PostgreSQL);
    /// `None` when it serves one (SQLite: the gateway's in-process counters are exact there).
    fn shared_counters(&self) -> Option<&dyn CounterStore> {
        None
    }

    /// Starts listening for the changes any handle on this store commits (another node, the
    /// CLI, a door's settings API) to the directory or to the injected faults: `changed` is
    /// notified after each such commit, and once each time the listener starts listening (at
    /// first, and again after a lost connection: what was committed while it was not listening
    /// is never announced). Nothing a send writes is announced. `None` when the store announces
    /// nothing (SQLite, which serves one node: its reloader re-checks the generation on its
    /// own). The task runs until aborted.
    fn spawn_change_listener(
        &self,
        _changed: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }

    /// Reads the whole directory.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// The current directory generation (cheap: servers re-check it to pick up changes).
    async fn generation(&self) -> Result<i64, StoreError>;

    /// Commits `changes` in one transaction if the directory is still at `expected_generation`,
    /// recording `actor` in the audit log. Returns the new generation.
    async fn commit(
        &self,
        expected_generation: i64,
        changes: &Changeset,
        actor: &str,
    ) -> Result<i64, StoreError>;

    /// The directory's audit log, newest first: the latest generation first and, within one
    /// change, the object written last first (the reverse of the order the change listed its
    /// objects), at most `limit` entries.
    async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;

    /// Writes (inserts or replaces) a running node's row.
    async fn node_seen(&self, node: &NodeState) -> Result<(), StoreError>;

    /// Deletes a node's row (it stopped).
    async fn node_gone(&self, id: &str) -> Result<(), StoreError>;

    /// Every node row.
    async fn nodes(&self) -> Result<Vec<NodeState>, StoreError>;

    /// Registers an admin API token by the SHA-256 (hex) of its secret.
    async fn add_admin_token(&self, name: &str, token_sha256: &str) -> Result<(), StoreError>;

    /// Finds the name of the admin token with this SHA-256 (hex).
    async fn admin_token(&self, token_sha256: &str) -> Result<Option<String>, StoreError>;

    /// Keeps a decision and its trace under its id; returns once it is durable.
    async fn record_decision(&self, decision: &StoredDecision) -> Result<(), StoreError>;

    /// Keeps a decision without waiting for it to be durable: it is committed before, or with,
    /// any write this store accepts after it, and [`Store::decision`] finds it at once. For the
    /// hot path, where the send's own acceptance makes it durable.
    async fn enqueue_decision(&self, decision: StoredDecision) -> Result<(), StoreError>;

    /// Waits until every write queued so far is durable (called at shutdown).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Finds a decision by id.
    async fn decision(&self, id: &str) -> Result<Option<StoredDecision>, StoreError>;

    /// The most recent stored refusals (`denied`), newest first, at most `limit`, looked for
    /// among the last 100,000 decisions (`mailgate support-bundle` lists them). Summaries only.
    async fn recent_refusals(&self, limit: u32) -> Result<Vec<DecisionSummary>, StoreError>;

    /// Records an accepted send for the usage counters, with the principal's new rate state.
    async fn record_usage(
        &self,
        principal: &str,
        entry: UsageEntry,
        rate_tat_ms: Option<i64>,
    ) -> Result<(), StoreError>;

    /// The usage to replay at start: sends since `since_ms` and every rate state. Older sends are
    /// deleted on the way (they no longer count for any limit).
    async fn usage_since(&self, since_ms: i64) -> Result<UsageReplay, StoreError>;

    /// Stores an accepted message and the usage it consumes in one durable transaction: when this
    /// returns `Ok`, the message survives a crash and the door may answer "accepted". Concurrent
    /// calls share a transaction (group commit).
    async fn accept_message(
        &self,
        message: &NewMessage,
        usage: Option<(UsageEntry, Option<i64>)>,
    ) -> Result<(), StoreError>;

    /// Stores a message whose send [`CounterStore::admit`] recorded, and frees its slot: the
    /// usage is already counted. When the message cannot be stored the slot is freed and the send
    /// refunded. Only for stores with [`Store::shared_counters`].
    async fn accept_admitted(
        &self,
        message: &NewMessage,
        slot: SendSlot,
    ) -> Result<(), StoreError> {
        let stored = self.accept_message(message, None).await;
        if let Some(c) = self.shared_counters() {
            c.release(slot, stored.is_err()).await?;
        }
        stored
    }

    /// A message's summary by id.
    async fn message(&self, id: &str) -> Result<Option<MessageSummary>, StoreError>;

    /// Retention: deletes finished messages (delivered, failed, captured) that finished before
    /// `messages_before_ms`, with their bodies and delivery history, then decisions taken before
    /// `decisions_before_ms` that no remaining message names. `None` keeps that kind.
    async fn purge(
        &self,
        decisions_before_ms: Option<i64>,
        messages_before_ms: Option<i64>,
    ) -> Result<Purged, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::{NODE_NUMBERS, message_id, message_id_node, new_message_id};

    const MS: u64 = 1_795_000_000_000;

    fn parts(id: u64) -> (u64, u64, u64) {
        (id >> 16, (id >> 10) & 0x3F, id & 0x3FF)
    }

    #[test]
    fn an_id_is_48_bits_of_ms_6_of_node_and_10_of_counter() {
        let id = message_id(MS, 37, 0);
        assert_eq!(parts(id), (MS, 37, 0));
        assert_eq!(parts(message_id(MS, 37, id)), (MS, 37, 1));
        // A later millisecond starts the counter again.
        assert_eq!(parts(message_id(MS + 5, 37, id)), (MS + 5, 37, 0));
        // A clock that went back: the ids keep increasing from the last one.
        assert_eq!(parts(message_id(MS - 1_000, 37, id)), (MS, 37, 1));
        let hex = format!("{id:016x}");
        assert_eq!(message_id_node(&hex), Some(37));
        assert_eq!(message_id_node("zz"), None);
        assert_eq!(message_id_node("00000000000000zz"), None);
    }

    #[test]
    fn a_full_counter_moves_on_to_the_next_millisecond_never_into_the_node_bits() {
        let mut last = 0;
        let mut ids = Vec::new();
        // 5,000 ids "in one millisecond" on node 63 (every node bit set) and on node 0.
        for node in [63, 0] {
            last = 0;
            for _ in 0..5_000 {
                last = message_id(MS, node, last);
                ids.push(last);
                assert_eq!(parts(last).1, u64::from(node), "{last:016x}");
            }
        }
        assert_eq!(parts(ids[1_023]), (MS, 63, 1_023));
        assert_eq!(parts(ids[1_024]), (MS + 1, 63, 0));
        // Node 63's and node 0's runs are each strictly increasing.
        assert!(ids[..5_000].windows(2).all(|w| w[0] < w[1]));
        assert!(ids[5_000..].windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parts(last), (MS + 4, 0, 5_000 - 4 * 1_024 - 1));
    }

    #[test]
    fn a_changed_node_number_keeps_one_process_ids_increasing() {
        let a = message_id(MS, 40, 0);
        let b = message_id(MS, 3, a);
        assert!(b > a);
        assert_eq!(parts(b), (MS + 1, 3, 0));
    }

    #[test]
    fn two_node_numbers_never_collide_in_the_same_milliseconds() {
        // Two processes, nodes 1 and 2, each making 100,000 ids over the same 50 ms (2,000 a
        // millisecond each, twice what the counter holds): never one id in common. (With the
        // old 16-bit counter from a random start, two such runs shared most of their ids.)
        let mut seen = std::collections::HashSet::new();
        for node in [1u16, 2] {
            let mut last = 0;
            for i in 0..100_000u64 {
                last = message_id(MS + i / 2_000, node, last);
                assert!(seen.insert(last), "{last:016x} made twice");
            }
        }
        // Every node number: 2,000 ids each in one millisecond, all different.
        let mut all = std::collections::HashSet::new();
        for node in 0..NODE_NUMBERS {
            let mut last = 0;
            for _ in 0..2_000 {
                last = message_id(MS, node, last);
                assert!(all.insert(last));
            }
        }
    }

    #[test]
    fn message_ids_never_repeat_within_one_millisecond_and_keep_gmail_shape() {
        let ids: Vec<String> = (0..100_000)
            .map(|_| new_message_id(1_795_000_000_000))
            .collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids are time-ordered");
        assert!(ids.iter().all(|id| {
            id.len() == 16
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }));
        // A later millisecond sorts after.
        assert!(new_message_id(1_795_000_001_000) > ids[ids.len() - 1]);
    }
}
