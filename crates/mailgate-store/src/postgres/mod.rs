//! The PostgreSQL store, for several gateway nodes on one database (issue 16). Migrations in
//! `migrations/postgres/` (the schema and every design decision, as SQL comments), compiled into
//! the binary and run at open under an advisory lock, so nodes starting together apply each
//! migration once.
//!
//! Every store trait is implemented, each whole and under the whole conformance suite:
//! [`FaultStore`](crate::FaultStore) (`faults.rs`), [`TokenStore`](crate::TokenStore)
//! (`tokens.rs`), [`Store`](crate::Store) (`directory.rs`) and [`QueueStore`](crate::QueueStore)
//! (`queue.rs`: leases with `FOR UPDATE SKIP LOCKED`, write-backs fenced by the lease).
//! [`open`](crate::open) opens it for `postgres://` URLs. Decisions the hot path does not wait
//! for are group-committed by a writer task, one statement per batch (`decisions.rs`). It shares
//! usage counters between nodes ([`CounterStore`](crate::CounterStore), `counters.rs`: one
//! admission transaction per send, the principal locked, re-checked with the engine's
//! arithmetic). Directory and fault changes are announced to every node by triggers and heard
//! with `LISTEN` on a connection of its own (`changes.rs`).

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::StoreError;

mod accept;
mod changes;
mod counters;
mod decisions;
mod directory;
mod error;
mod faults;
mod handoff;
mod jobs;
mod lockout;
mod node_numbers;
mod queue;
mod tokens;
mod uploads;

pub use accept::AdmissionStats;
pub use decisions::DecisionBatches;
pub(crate) use error::OrStore;
pub use error::redact;

/// The advisory lock held while migrating (and creating decision partitions ahead): one key for
/// every Mailgate, whatever the database's name ("MAILGATE" in ASCII).
pub const MIGRATION_LOCK: i64 = 0x4D41_494C_4741_5445;

/// How many days of decision partitions exist ahead of today after an open.
pub(crate) const PARTITION_DAYS_AHEAD: i32 = 7;

/// How long an open waits for the server before calling it unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections one node opens.
const MAX_CONNECTIONS: u32 = 16;

/// The PostgreSQL store: a connection pool on one database. Every call is one or a few
/// statements on it; each write commits before the call returns, except decisions queued with
/// `enqueue_decision`, which a writer task group-commits (`decisions.rs`).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    decisions: decisions::DecisionQueue,
    accepts: accept::AcceptQueues,
    handoff: std::sync::Arc<handoff::Handoff>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`) and brings
    /// its schema up to date. Errors: [`StoreError::Unavailable`] naming the URL (never its
    /// password) when the server cannot be reached or the login is refused;
    /// [`StoreError::SchemaTooNew`] when a newer Mailgate migrated the database.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let shown = redact(url);
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            StoreError::Other(format!(
                "`{shown}` is not a PostgreSQL URL: {}",
                without(&e, url)
            ))
        })?;
        // READ COMMITTED on every connection whatever the database's default (an operator's
        // `default_transaction_isolation`): the admission's statements after a principal's lock
        // must see the previous holder's commit, also in the implicit transaction of one
        // statement (`mailgate_admit` refuses to run under another level).
        let options = options.options([("default_transaction_isolation", "read committed")]);
        let unreachable = |e: StoreError| match e {
            StoreError::Unavailable(text) | StoreError::Busy(text) => {
                StoreError::Unavailable(format!(
                    "cannot reach PostgreSQL at `{shown}`: {}",
                    scrub(&text, url)
                ))
            }
            other => other,
        };
        // Migrations on a connection of their own: the advisory lock is the session's, and
        // closing the connection releases it whatever happened (a pooled connection would keep
        // it after an error).
        let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "cannot reach PostgreSQL at `{shown}`: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .or_store()
            .map_err(unreachable)?;
        let migrated = migrate(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .or_store()
            .map_err(unreachable)?;
        let decisions = decisions::DecisionQueue::start(pool.clone());
        let handoff = std::sync::Arc::new(handoff::Handoff::default());
        tokio::spawn(handoff::sweep(
            pool.clone(),
            std::sync::Arc::downgrade(&handoff),
        ));
        let accepts = accept::AcceptQueues::start(pool.clone(), decisions.clone(), handoff.clone());
        Ok(PgStore {
            pool,
            decisions,
            accepts,
            handoff,
        })
    }

    /// The connection pool (for backend-specific tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How admission batches were recorded so far (for tests and `docs/performance.md`).
    pub fn admission_stats(&self) -> AdmissionStats {
        self.accepts.admission_stats()
    }

    /// How many times an admission batch is read and re-checked without its principals' locks
    /// before they are taken over its reading (default 3; 0: always locked). For tests.
    #[doc(hidden)]
    pub fn set_optimistic_admission_tries(&self, tries: usize) {
        self.accepts.set_optimistic_tries(tries);
    }

    /// How the decision writer batched so far (for tests and `docs/performance.md`).
    pub fn decision_batches(&self) -> DecisionBatches {
        self.decisions.stats()
    }
}

/// Applies the migrations this binary has, under [`MIGRATION_LOCK`], then makes the decision
/// partitions of the coming days (under the same lock: one node at a time creates them).
async fn migrate(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .or_store()?;
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    // Our lock, not sqlx's (which is per database name and would be kept on an early return).
    migrator.set_locking(false);
    // `run_direct` on the connection itself (`run` takes an `Acquire`, whose future is not `Send`
    // for every lifetime, so an `open` using it could not be spawned).
    migrator
        .run_direct(None, &mut *conn, false)
        .await
        .or_store()?;
    sqlx::query("SELECT mailgate_decision_partitions($1, $2)")
        .bind(now_ms())
        .bind(PARTITION_DAYS_AHEAD)
        .execute(&mut *conn)
        .await
        .or_store()?;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .or_store()?;
    Ok(())
}

/// An error's text with `url` (and so any password in it) removed.
fn without(e: &dyn std::fmt::Display, url: &str) -> String {
    scrub(&e.to_string(), url)
}

fn scrub(text: &str, url: &str) -> String {
    if url.is_empty() {
        text.to_owned()
    } else {
        text.replace(url, &redact(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens on port 1: the open fails as unavailable, names the URL and not its
    /// password.
    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_and_the_password_is_not_shown() {
        let e = PgStore::open("postgres://mailgate:hunter2@127.0.0.1:1/mailgate")
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(e.is_temporary());
        let text = e.to_string();
        assert!(text.contains("127.0.0.1:1/mailgate"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
