//! Fault injection (`mailgate simulate`, `POST /mailgate/v1/simulate`): a principal's sends fail
//! with a chosen reason code for a while, to test a client's error handling. Kept in the store so
//! every node sees them; the gateway reads the ones in force each time it reloads.

use async_trait::async_trait;
use serde::Serialize;

use crate::StoreError;

/// A fault injected by `mailgate simulate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimulatedFault {
    /// The principal (a user's primary address, ...).
    pub principal: String,
    /// The reason code its sends fail with.
    pub code: String,
    /// Until when (Unix ms).
    pub until_ms: i64,
    /// When set (Unix ms).
    pub created_at_ms: i64,
    /// Who set it (`cli:<user>`, `admin-token:<name>`).
    pub actor: String,
}

/// Where injected faults are kept.
#[async_trait]
pub trait FaultStore: Send + Sync {
    /// Makes `principal`'s sends fail with reason `code` until `until_ms` (replacing any earlier one).
    async fn set_fault(&self, fault: &SimulatedFault) -> Result<(), StoreError>;

    /// Removes `principal`'s injected fault; false when there was none.
    async fn clear_fault(&self, principal: &str) -> Result<bool, StoreError>;

    /// Injected faults still active at `now_ms` (expired ones are deleted on the way).
    async fn active_faults(&self, now_ms: i64) -> Result<Vec<SimulatedFault>, StoreError>;
}
