//! Hand-off of freshly accepted messages to the accepting node's own delivery workers, as
//! Postfix's queue manager is handed each new message (the benchmark's floor, issue 16).
//!
//! Without it every accepted message costs PostgreSQL a lease (`FOR UPDATE SKIP LOCKED` over the
//! pending messages, a new row version, its body read back and sent to the node that had it in
//! memory a moment before) and, for workers woken for nothing, a next-due scan. With it, the
//! acceptance's own statement inserts the message **already leased** to this node (a new
//! `lease_epoch`, the lease running from its acceptance for `relay.lease_ms`) with its recipient
//! rows, and the message (body included) waits in memory for the next `lease_due` of any of the
//! node's workers, which returns it without a statement.
//!
//! Invariants:
//! - A message is handed off only to a node run whose workers asked for work within
//!   [`FRESH`] (a process without workers, e.g. an admin verb, or one whose workers stopped,
//!   leaves its messages to the shared queue), and only while the hand-off holds fewer than
//!   [`MAX_MESSAGES`] messages and [`MAX_BYTES`] bytes; every other message is stored unleased
//!   and leased from the shared queue as before.
//! - The lease is an ordinary lease in the shared store, taken under the owner
//!   `<node>/<run>/accepted` ([`handoff_owner`]): another node leases the message only once that
//!   lease expired, `reclaim_leases` of the node takes it back (a restart of the node), and
//!   every write-back is fenced by its epoch as any other. Any worker of the same run may write
//!   back under it: the fences accept a worker's own owner and its run's hand-off owner.
//! - A message waiting in memory whose lease has less than half its length left is extended
//!   (fenced) before a worker gets it, and dropped from memory if the extension finds the lease
//!   over (another node has it).
//! - A message waits in memory at most about [`STALE`] plus [`SWEEP_EVERY`]: then [`sweep`] ends
//!   its lease (a new epoch, unmarked) and any node's worker takes it from the shared queue, so
//!   a node whose workers are all busy (a slow smarthost) holds nothing back for long.
//! - A node shutting down ends the leases of the messages still waiting
//!   (`QueueStore::release_handed_off`): due at once for the other nodes, not marked.
//! - A node that dies with messages handed off loses only the memory: the messages are leased in
//!   the store and are delivered by another node once the lease expires (or by the node itself
//!   at its restart), marked `possible_duplicate` as every lease that ended without an outcome.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::queue::LeasedMessage;

/// The last segment of a hand-off lease's owner.
const SUFFIX: &str = "accepted";

/// A node run whose workers have not asked for work for this long is handed nothing.
pub(crate) const FRESH: Duration = Duration::from_secs(5);

/// Most messages waiting in one run's hand-off.
pub(crate) const MAX_MESSAGES: usize = 1024;

/// Most bytes of message bodies waiting in one run's hand-off.
pub(crate) const MAX_BYTES: usize = 32 * 1024 * 1024;

/// A message waiting longer than this for one of its run's workers (all busy: a slow smarthost)
/// goes back to the shared queue (its lease ended, unmarked), where any node's idle worker takes
/// it; [`sweep`] looks every [`SWEEP_EVERY`].
pub(crate) const STALE: Duration = Duration::from_secs(2);

/// How often [`sweep`] looks for messages waiting longer than [`STALE`].
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How often a worker that is handed messages also looks at the shared queue (retries come due,
/// other nodes' messages, held ones released), however many are handed to it.
pub(crate) const SHARED_EVERY: Duration = Duration::from_millis(500);

/// The owner under which the run of worker `owner` (`<node>/<run>/<worker>`, see
/// [`crate::lease_owner`]) takes hand-off leases: `<node>/<run>/accepted`. An owner without `/`
/// is a node of its own: `<owner>/accepted`.
pub(crate) fn handoff_owner(owner: &str) -> String {
    match owner.rsplit_once('/') {
        Some((run, _)) => format!("{run}/{SUFFIX}"),
        None => format!("{owner}/{SUFFIX}"),
    }
}

/// The owners a write-back of worker `owner` may hold a lease under: its own and its run's
/// hand-off owner (what the fences compare with `= ANY`).
pub(crate) fn fence_owners(owner: &str) -> [String; 2] {
    [owner.to_owned(), handoff_owner(owner)]
}

#[derive(Debug)]
struct Run {
    lease_ms: i64,
    asked: Instant,
    shared_at: Option<Instant>,
    /// Oldest first, each with when it was handed.
    waiting: VecDeque<(Instant, LeasedMessage)>,
    bytes: usize,
}

/// The messages handed off, per node run (keyed by hand-off owner).
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    runs: Mutex<HashMap<String, Run>>,
}

/// Where a batch of acceptances may be handed: the owner to lease them under, for how long, and
/// how many messages and bytes there is room for.
#[derive(Debug, Clone)]
pub(crate) struct Room {
    pub owner: String,
    pub lease_ms: i64,
    pub messages: usize,
    pub bytes: usize,
}

/// What [`Handoff::take`] gives a worker.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// Messages handed off, oldest first.
    pub messages: Vec<LeasedMessage>,
    /// True when the worker should also lease from the shared queue.
    pub look_shared: bool,
}

impl Handoff {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker `owner` asks for up to `limit` messages, leasing for `lease_ms`: its run is
    /// (again) one to hand messages to, and the messages waiting for it are returned.
    pub(crate) fn take(&self, owner: &str, lease_ms: i64, limit: usize) -> Taken {
        let now = Instant::now();
        let mut runs = self.runs();
        let run = runs.entry(handoff_owner(owner)).or_insert_with(|| Run {
            lease_ms,
            asked: now,
            shared_at: None,
            waiting: VecDeque::new(),
            bytes: 0,
        });
        run.lease_ms = lease_ms;
        run.asked = now;
        let n = limit.min(run.waiting.len());
        let messages: Vec<LeasedMessage> = run.waiting.drain(..n).map(|(_, m)| m).collect();
        run.bytes -= messages.iter().map(|m| m.raw.len()).sum::<usize>();
        let look_shared =
            messages.is_empty() || run.shared_at.is_none_or(|t| now - t >= SHARED_EVERY);
        if look_shared {
            run.shared_at = Some(now);
        }
        Taken {
            messages,
            look_shared,
        }
    }

    /// Where the next batch of acceptances may go: the run whose workers asked most recently
    /// (within [`FRESH`]) with room left; `None` when there is none.
    pub(crate) fn room(&self) -> Option<Room> {
        let now = Instant::now();
        self.runs()
            .iter()
            .filter(|(_, r)| now - r.asked < FRESH)
            .max_by_key(|(_, r)| r.asked)
            .and_then(|(owner, r)| {
                let messages = MAX_MESSAGES.saturating_sub(r.waiting.len());
                let bytes = MAX_BYTES.saturating_sub(r.bytes);
                (messages > 0 && bytes > 0).then(|| Room {
                    owner: owner.clone(),
                    lease_ms: r.lease_ms,
                    messages,
                    bytes,
                })
            })
    }

    /// Messages leased under `owner` by their acceptance, committed: they wait for that run's
    /// workers.
    pub(crate) fn give(&self, owner: &str, messages: Vec<LeasedMessage>) {
        if messages.is_empty() {
            return;
        }
        let mut runs = self.runs();
        let Some(run) = runs.get_mut(owner) else {
            // Cannot happen (runs are never removed); the leases expire and the shared queue
            // delivers them.
            tracing::warn!(
                owner,
                messages = messages.len(),
                "hand-off run vanished; its messages wait for their leases to expire"
            );
            return;
        };
        run.bytes += messages.iter().map(|m| m.raw.len()).sum::<usize>();
        let now = Instant::now();
        run.waiting.extend(messages.into_iter().map(|m| (now, m)));
    }

    /// Takes every message waiting, for every run: (id, lease epoch) each.
    pub(crate) fn drain(&self) -> Vec<(String, i64)> {
        self.drain_older_than(Duration::ZERO)
    }

    /// Takes the messages that have waited at least `age` (every worker of their run busy that
    /// long, e.g. on a slow smarthost): (id, lease epoch) each.
    pub(crate) fn drain_older_than(&self, age: Duration) -> Vec<(String, i64)> {
        let mut runs = self.runs();
        let mut out = Vec::new();
        for r in runs.values_mut() {
            while r.waiting.front().is_some_and(|(at, _)| at.elapsed() >= age) {
                if let Some((_, m)) = r.waiting.pop_front() {
                    r.bytes -= m.raw.len();
                    out.push((m.id, m.lease));
                }
            }
        }
        out
    }

    /// True when a message waits for any run's worker.
    pub(crate) fn any_waiting(&self) -> bool {
        self.runs().values().any(|r| !r.waiting.is_empty())
    }
}

/// Ends the hand-off leases `waiting` (id, epoch): each message is due at once in the shared
/// queue, not marked (nobody attempted it). Fenced by the epoch; a new epoch, as a take-back
/// gives. Returns how many were released.
pub(crate) async fn release(
    pool: &sqlx::PgPool,
    waiting: Vec<(String, i64)>,
    now_ms: i64,
) -> Result<u64, crate::StoreError> {
    use super::OrStore;
    if waiting.is_empty() {
        return Ok(0);
    }
    let (ids, epochs): (Vec<String>, Vec<i64>) = waiting.into_iter().unzip();
    Ok(sqlx::query(
        "UPDATE messages m SET lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = $3,
             lease_epoch = nextval('message_lease_epoch')
         FROM unnest($1::text[], $2::bigint[]) AS l(id, epoch)
         WHERE m.id = l.id AND m.lease_epoch = l.epoch AND m.state IN ('queued', 'deferred')",
    )
    .bind(&ids)
    .bind(&epochs)
    .bind(now_ms)
    .execute(pool)
    .await
    .or_store()?
    .rows_affected())
}

/// Every [`SWEEP_EVERY`], returns the messages waiting longer than [`STALE`] to the shared queue
/// ([`release`]). Ends when the store is dropped (the last `Arc` of `handoff`).
pub(crate) async fn sweep(pool: sqlx::PgPool, handoff: std::sync::Weak<Handoff>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(handoff) = handoff.upgrade() else {
            return;
        };
        let stale = handoff.drain_older_than(STALE);
        drop(handoff);
        if stale.is_empty() {
            continue;
        }
        let n = stale.len();
        match release(&pool, stale, super::now_ms()).await {
            Ok(released) => tracing::info!(
                messages = n,
                released,
                "delivery: accepted messages waited over {}s for this node's busy workers; back to the shared queue",
                STALE.as_secs()
            ),
            Err(e) => {
                tracing::warn!(error = %e, messages = n, "could not return accepted messages to the shared queue: they are delivered when their lease expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(id: &str, size: usize) -> LeasedMessage {
        LeasedMessage {
            id: id.into(),
            decision_id: "d".into(),
            door: "smtp".into(),
            accepted_at_ms: 0,
            envelope_from: "a@example.com".into(),
            recipients: Vec::new(),
            attempts: 0,
            raw: vec![b'x'; size],
            lease_until_ms: 1,
            lease: 1,
            possible_duplicate: false,
        }
    }

    #[test]
    fn a_workers_run_shares_one_handoff_owner() {
        assert_eq!(handoff_owner("n1/r1/0"), "n1/r1/accepted");
        assert_eq!(handoff_owner("n1/r1/3"), "n1/r1/accepted");
        assert_eq!(handoff_owner("w1"), "w1/accepted");
        assert_eq!(fence_owners("n1/r1/2"), ["n1/r1/2", "n1/r1/accepted"]);
    }

    #[test]
    fn nothing_is_handed_to_a_run_whose_workers_never_asked() {
        let h = Handoff::default();
        assert!(h.room().is_none());
        let t = h.take("n/r/0", 2_000, 32);
        assert!(t.messages.is_empty() && t.look_shared);
        let room = h.room().unwrap();
        assert_eq!(room.owner, "n/r/accepted");
        assert_eq!(room.lease_ms, 2_000);
        assert_eq!((room.messages, room.bytes), (MAX_MESSAGES, MAX_BYTES));
    }

    #[test]
    fn any_worker_of_the_run_takes_what_was_handed_oldest_first_and_room_is_bounded() {
        let h = Handoff::default();
        h.take("n/r/0", 2_000, 32);
        h.give(
            "n/r/accepted",
            (0..5).map(|i| leased(&format!("m{i}"), 10)).collect(),
        );
        assert!(h.any_waiting());
        assert_eq!(h.room().unwrap().messages, MAX_MESSAGES - 5);
        assert_eq!(h.room().unwrap().bytes, MAX_BYTES - 50);
        let t = h.take("n/r/3", 2_000, 3);
        let ids: Vec<&str> = t.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["m0", "m1", "m2"]);
        // Handed messages: the shared queue is looked at every SHARED_EVERY, not every time.
        let t = h.take("n/r/1", 2_000, 32);
        assert_eq!(t.messages.len(), 2);
        assert!(!t.look_shared, "looked at the shared queue twice in a row");
        assert!(!h.any_waiting());
        // Full: nothing more is handed to the run until its workers take some.
        h.give("n/r/accepted", vec![leased("big", MAX_BYTES)]);
        assert!(h.room().is_none());
        // Another run's worker gets none of them, and its run is handed the next ones.
        assert!(h.take("n/other/0", 2_000, 32).messages.is_empty());
        assert_eq!(h.room().unwrap().owner, "n/other/accepted");
        assert_eq!(h.take("n/r/0", 2_000, 32).messages.len(), 1);
    }

    #[test]
    fn only_messages_waiting_at_least_the_age_are_drained_oldest_first() {
        let h = Handoff::default();
        h.take("n/r/0", 2_000, 32);
        h.give("n/r/accepted", vec![leased("old", 10)]);
        std::thread::sleep(Duration::from_millis(30));
        h.give("n/r/accepted", vec![leased("new", 10)]);
        assert_eq!(
            h.drain_older_than(Duration::from_millis(20)),
            [("old".to_owned(), 1)]
        );
        assert_eq!(h.room().unwrap().bytes, MAX_BYTES - 10);
        assert_eq!(h.drain(), [("new".to_owned(), 1)]);
        assert!(!h.any_waiting());
    }
}
