//! Usage counters shared by several nodes: the one atomic admission step of a send.
//!
//! On one node (SQLite) the gateway's in-process counters are exact and the authority
//! (`mailgate_core::engine::MemoryCounters`, replayed from the store at start), so a store that
//! serves one node has no [`CounterStore`] ([`crate::Store::shared_counters`] is `None`). On
//! PostgreSQL every node admits through the store:
//!
//! 1. the gateway reads the principal's live [`Usage`] ([`CounterStore::usage`]) and the engine
//!    decides with those numbers;
//! 2. [`CounterStore::admit`] locks the principal, reads its usage again, re-checks the decision
//!    with the engine's arithmetic (`mailgate_core::engine::recheck`) and, when it stands,
//!    records the send (a usage row, the rate TAT, a concurrent-send slot) in one transaction.
//!    When the numbers it read change the outcome it records nothing and returns them
//!    ([`Admitted::Changed`]): the gateway decides again with them, so the refusal is the
//!    engine's own, with the numbers the store saw;
//! 3. the slot is freed when the message is stored ([`CounterStore::release`]); a slot whose
//!    holder died counts only until its deadline.

use async_trait::async_trait;
use mailgate_core::directory::LimitName;
use mailgate_core::engine::{Charge, Usage};

use crate::{NewMessage, StoreError};

/// A concurrent-send slot taken by [`CounterStore::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendSlot(pub i64);

/// What [`CounterStore::admit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// Recorded; free the slot with [`CounterStore::release`] once the message is stored. The
    /// usage is the principal's as this send left it (counted in, slot held): what the node
    /// knows of it until its next admission (the gateway decides the principal's next sends
    /// with it and reads live numbers only for a refusal or a hold).
    Recorded(SendSlot, Usage),
    /// The principal's live numbers change the decision: nothing was recorded. Decide again with
    /// these numbers.
    Changed(Usage),
}

/// What [`CounterStore::admit_and_store`] did.
#[derive(Debug)]
pub enum AdmitStored {
    /// Admitted and stored, durably, in one transaction (no slot to free). The usage is the
    /// principal's as this send left it, as [`Admitted::Recorded`]'s.
    Stored(Usage),
    /// Nothing recorded or written (the store has no such step, a limit holds the send, or the
    /// principal's live numbers are past what its batch could take at once): admit and store it
    /// in two steps ([`CounterStore::admit`], then [`crate::Store::accept_admitted`]). The
    /// message is given back unchanged.
    TwoSteps(Box<NewMessage>),
}

/// Usage counters every node shares (see the module documentation).
#[async_trait]
pub trait CounterStore: Send + Sync {
    /// The principal's live usage at `now_ms`: the last 24 h of admitted sends, the rate TAT
    /// and the unexpired send slots.
    async fn usage(&self, principal: &str, now_ms: u64) -> Result<Usage, StoreError>;

    /// Atomically (one transaction, the principal locked): re-checks `charge` against the live
    /// usage with the engine's arithmetic, `held` being the limits the decision held the send
    /// for, and when the decision stands records the send at `now_ms` with a slot held by
    /// `holder` (`<node>/<run>`) until `slot_until_ms`. Records nothing otherwise.
    async fn admit(
        &self,
        charge: &Charge,
        held: &[LimitName],
        now_ms: u64,
        holder: &str,
        slot_until_ms: u64,
    ) -> Result<Admitted, StoreError>;

    /// The two steps at once, when the store can (step 2 and 3 of the module documentation in
    /// one durable transaction): admits `charge` (a send no limit holds) as [`CounterStore::admit`]
    /// would, and stores `message` with it. Exact as `admit` is; when the store cannot tell
    /// without re-checking the send on its live numbers, it does nothing and gives the message
    /// back ([`AdmitStored::TwoSteps`]). The default (a store without the step) always does.
    async fn admit_and_store(
        &self,
        _charge: &Charge,
        _now_ms: u64,
        _holder: &str,
        message: NewMessage,
    ) -> Result<AdmitStored, StoreError> {
        Ok(AdmitStored::TwoSteps(Box::new(message)))
    }

    /// Frees a slot. With `refund`, the send it admitted is taken back out of the daily counts
    /// (its message could not be stored); the rate schedule keeps its place.
    async fn release(&self, slot: SendSlot, refund: bool) -> Result<(), StoreError>;

    /// Frees every slot whose holder is `<node>/...` (a node starting again: none of its earlier
    /// sends is in flight any more). Returns how many.
    async fn release_node(&self, node: &str) -> Result<u64, StoreError>;
}
