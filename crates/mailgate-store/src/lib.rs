//! Mailgate's storage, backend-neutral at its edges: the traits the rest of Mailgate uses
//! ([`Store`] for the directory, decisions, usage and acceptance; [`QueueStore`] for delivery;
//! [`TokenStore`] for OAuth tokens; [`FaultStore`] for injected faults), their types, typed states
//! ([`MessageState`], [`RecipientState`], [`StoredVerdict`], [`TokenKind`]) and one error,
//! [`StoreError`], that names no database crate.
//!
//! Backends live in their own modules: [`sqlite`] (the embedded default; migrations in
//! `migrations/sqlite/`) and [`postgres`] (for several nodes; migrations in
//! `migrations/postgres/`), each implementing the same traits with its own schema. Open a store with [`open`], which returns the trait
//! objects ([`Stores`]): nothing outside this crate needs to name a backend.
//!
//! With the `testing` feature (for tests only), `testing` gives a test a fresh store on the
//! backend the run asks for (`MAILGATE_TEST_STORE`), so one test runs on SQLite and PostgreSQL.

mod counters;
mod error;
mod faults;
mod jobs;
mod lockout;
mod migrations;
mod node_numbers;
pub mod postgres;
mod queue;
pub mod sqlite;
mod states;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod tokens;
mod uploads;

use std::path::Path;
use std::sync::Arc;

pub use counters::{AdmitStored, Admitted, CounterStore, SendSlot};
pub use error::StoreError;
pub use faults::{FaultStore, SimulatedFault};
pub use jobs::{JobGuard, JobStore};
pub use lockout::{Counted, LockoutRule, LockoutStore, MAX_KEY_LEN as MAX_LOCKOUT_KEY_LEN};
pub use node_numbers::{NODE_NUMBERS, NodeNumberStore};
pub use queue::{
    AttemptEntry, AttemptReport, CAPTURED_HEAD_BYTES, CapturedMessage, LeasedMessage,
    MessageStatus, NodeLeases, QueueEntry, QueueFilter, QueueStore, RecipientOutcome,
    RecipientStatus, Recorded, RetryOutcome, lease_owner,
};
pub use states::{
    AuditAction, MessageState, RecipientState, StoredVerdict, TokenKind, message_state,
};
pub use store::{
    AuditEntry, Changeset, DecisionSummary, MessageSummary, NewMessage, NodeState, Purged,
    Snapshot, Store, StoredDecision, TraceJson, UsageEntry, UsageReplay, message_id,
    message_id_node, new_message_id, set_message_id_node,
};
pub use tokens::{CachedTokens, TOKEN_CACHE_MAX, TOKEN_CACHE_TTL, TokenRecord, TokenStore};
pub use uploads::{UploadOpened, UploadStore};

/// One opened store, as the trait objects the rest of Mailgate holds. Every field is a handle on
/// the same database: `directory` (which also keeps the injected faults), the delivery `queue`
/// and the OAuth `tokens`.
#[derive(Clone)]
pub struct Stores {
    /// The directory, decisions, usage, accepted messages, nodes, admin tokens and faults.
    pub directory: Arc<dyn Store>,
    /// The delivery queue.
    pub queue: Arc<dyn QueueStore>,
    /// OAuth tokens.
    pub tokens: Arc<dyn TokenStore>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// The trait objects of one backend value that implements them all.
    pub fn of<S: Store + QueueStore + TokenStore + 'static>(store: S) -> Stores {
        let store = Arc::new(store);
        Stores {
            directory: store.clone(),
            queue: store.clone(),
            tokens: store,
        }
    }
}

/// Opens (creating if needed) the store at `url_or_path` and brings its schema up to date:
/// `sqlite://<path>` or `sqlite:<path>` or a plain file path (SQLite), or
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (`postgresql://` too; PostgreSQL, for several
/// nodes on one database). A URL of a backend this build does not have is refused with
/// [`StoreError::Unavailable`].
pub async fn open(url_or_path: &str) -> Result<Stores, StoreError> {
    if let Some(path) = url_or_path
        .strip_prefix("sqlite://")
        .or_else(|| url_or_path.strip_prefix("sqlite:"))
    {
        return open_path(Path::new(path)).await;
    }
    if url_or_path.starts_with("postgres://") || url_or_path.starts_with("postgresql://") {
        return Ok(Stores::of(postgres::PgStore::open(url_or_path).await?));
    }
    if let Some((scheme, _)) = url_or_path.split_once("://") {
        return Err(StoreError::Unavailable(format!(
            "no `{scheme}` store in this build (sqlite://<path>, a file path, or postgres://...)"
        )));
    }
    open_path(Path::new(url_or_path)).await
}

/// Opens (creating if needed) the SQLite database file `path`.
pub async fn open_path(path: &Path) -> Result<Stores, StoreError> {
    Ok(Stores::of(sqlite::SqliteStore::open(path).await?))
}

/// A private, empty store for tests (an SQLite file of its own, deleted with its last handle).
pub async fn in_memory() -> Result<Stores, StoreError> {
    Ok(Stores::of(sqlite::SqliteStore::in_memory().await?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[tokio::test]
    async fn open_takes_a_path_or_an_sqlite_or_postgres_url_and_refuses_other_backends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let by_path = open(path.to_str().unwrap()).await.unwrap();
        let by_url = open(&format!("sqlite://{}", path.display())).await.unwrap();
        let cs = Changeset::between(&Default::default(), &{
            let mut d = mailgate_core::directory::Directory::default();
            d.users
                .push(mailgate_core::directory::User::new("a@example.com"));
            d
        });
        by_path.directory.commit(0, &cs, "t").await.unwrap();
        // The same database through the other handle.
        assert_eq!(by_url.directory.generation().await.unwrap(), 1);
        let e = open("mysql://u@127.0.0.1/db").await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        // A PostgreSQL URL is PostgreSQL's (nothing listens on port 1: unreachable).
        let e = open("postgres://u@127.0.0.1:1/db").await.unwrap_err();
        assert!(e.to_string().contains("PostgreSQL"), "{e}");
    }
}
