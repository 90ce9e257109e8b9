//! Gmail resumable-upload sessions shared by every node (issue 16 item 5): an upload started on
//! one node (`POST ?uploadType=resumable`) can be finished on another (the `PUT` of the message
//! to the `Location` it was given). A session is its id, its owner (the authenticated
//! principal), the `userId` it was opened for and its expiry: the message itself travels whole
//! in the `PUT`, to the node that receives it, so no body is stored. Bounded: at most
//! `per_owner` open sessions per principal and `total` in all, each expiring.

use async_trait::async_trait;

use crate::StoreError;

/// What opening a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOpened {
    /// Opened.
    Opened,
    /// The principal holds its maximum: retry after this many ms (its first session expires).
    OwnerFull { retry_after_ms: i64 },
    /// The store holds its maximum: retry after this many ms.
    Full { retry_after_ms: i64 },
}

/// Where open resumable-upload sessions are kept.
#[async_trait]
pub trait UploadStore: Send + Sync {
    /// Opens session `id` for `owner` acting for `user_id`, until `now_ms + ttl_ms`, unless
    /// `owner` already holds `per_owner` unexpired sessions or the store `total` (expired ones
    /// are deleted on the way). Atomic across nodes: two opens never both take a principal's
    /// last place.
    #[allow(
        clippy::too_many_arguments,
        reason = "one session's facts and its bounds"
    )]
    async fn open_upload(
        &self,
        id: &str,
        owner: &str,
        user_id: &str,
        now_ms: i64,
        ttl_ms: i64,
        per_owner: u32,
        total: u32,
    ) -> Result<UploadOpened, StoreError>;

    /// Takes (closes) session `id` if it is `owner`'s, for `user_id`, and unexpired at `now_ms`;
    /// false otherwise (another principal's session stays open). Once: a second take is false.
    async fn take_upload(
        &self,
        id: &str,
        owner: &str,
        user_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
}
