//! Node numbers for message ids (issue 16 item 5): each running node leases one of
//! [`NODE_NUMBERS`] numbers from the store when it joins and renews it with its heartbeat, and
//! writes it into every message id it makes ([`crate::set_message_id_node`]), so two nodes on one
//! database never make the same id. A number is held by a holder (a node's `[node] id`) until a
//! deadline: a node that stops renewing loses it at its deadline, and a node started again with
//! the same id takes its own number back at once.

use async_trait::async_trait;

use crate::StoreError;

pub use crate::store::NODE_NUMBERS;

/// Where nodes lease their message-id node numbers.
#[async_trait]
pub trait NodeNumberStore: Send + Sync {
    /// Leases a node number (0 to 63) to `holder` until `until_ms` (Unix ms), in one
    /// transaction: the number `holder` holds already, renewed (also after its deadline, as long
    /// as nobody took it since), else the lowest number that nobody holds or whose holder's
    /// deadline is before `now_ms`. `None` when every number is held by another holder whose
    /// deadline has not passed. Two holders never hold one number at once, also when they lease
    /// at the same moment from different nodes.
    async fn lease_node_number(
        &self,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Option<u16>, StoreError>;
}
