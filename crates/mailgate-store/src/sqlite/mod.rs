//! The embedded default store: one SQLite file in WAL mode with `synchronous=FULL`, migrations
//! compiled into the binary. Several processes (a running server and the admin CLI) may use the
//! same file at once: writers take the lock up front (`BEGIN IMMEDIATE`) and wait for each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::{StoreError, StoredDecision, StoredVerdict};
use group::Writer;

mod directory;
mod error;
mod faults;
pub(crate) mod group;
mod jobs;
mod lockout;
mod node_numbers;
mod packed;
mod queue;
mod tokens;
mod uploads;

pub(crate) use error::{OrStore, thread_gone};
pub use group::GroupCommitStats;

/// The embedded SQLite store.
///
/// Reads use a pool of connections (WAL readers never wait for the writer). The hot writes (a
/// send's decision and message, delivery bookkeeping) run on the write thread, group-committed
/// (see `sqlite/group.rs`); the rare ones (directory, tokens, retention) on one sqlx connection of
/// their own, which waits for the thread in SQLite's busy handler when both write at once.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
    /// Set while the sqlx write connection may be left at `synchronous = NORMAL`.
    relaxed: Arc<AtomicBool>,
    /// The writer thread: hot writes and delivery bookkeeping (see [`group`]).
    group: Writer,
    path: PathBuf,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::connect(path, Vec::new()).await
    }

    /// Opens a private store for tests: a database file of its own in the temporary directory,
    /// deleted when the last handle is dropped. (SQLite's `:memory:` databases are private to
    /// one connection, and the write connection is a connection of its own.)
    pub async fn in_memory() -> Result<Self, StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "mailgate-{}-{}-{}.db",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u64(..)
        ));
        let files = ["", "-wal", "-shm"]
            .iter()
            .map(|ext| PathBuf::from(format!("{}{ext}", path.display())))
            .collect();
        Self::connect(&path, files).await
    }

    async fn connect(path: &Path, remove_on_exit: Vec<PathBuf>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let relaxed = Arc::new(AtomicBool::new(false));
        let flag = relaxed.clone();
        // The writes that are not hot (directory, tokens, admin, retention) use sqlx on a
        // connection of their own; they are rare, and wait in SQLite's busy handler while the
        // writer thread holds the write lock (and the other way round).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // Every use starts durable, whatever a relaxed writer set last.
            .before_acquire(move |conn, _| {
                let flag = flag.clone();
                Box::pin(async move {
                    if flag.swap(false, Ordering::AcqRel)
                        && let Err(e) = sqlx::query("PRAGMA synchronous = FULL")
                            .execute(&mut *conn)
                            .await
                    {
                        flag.store(true, Ordering::Release);
                        return Err(e);
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await
            .or_store()?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .or_store()?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .or_store()?;
        Ok(SqliteStore {
            group: Writer::start(path, Some(pool.clone()), remove_on_exit)?,
            writer,
            pool,
            relaxed,
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The write connection's thread (hot writes and delivery bookkeeping).
    pub(crate) fn write_thread(&self) -> &Writer {
        &self.group
    }

    async fn read_decision(&self, id: &str) -> Result<Option<StoredDecision>, StoreError> {
        let row = sqlx::query(
            "SELECT id, at_ms, door, principal, verdict, code, typeof(body) = 'blob' AS packed,
                    CAST(body AS BLOB) AS body
             FROM decisions WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .or_store()?;
        let Some(row) = row else { return Ok(None) };
        let body: Vec<u8> = row.try_get("body").or_store()?;
        let body = packed::unpack(body, row.try_get("packed").or_store()?)?;
        Ok(Some(StoredDecision {
            id: row.try_get("id").or_store()?,
            at_ms: row.try_get("at_ms").or_store()?,
            door: row.try_get("door").or_store()?,
            principal: row.try_get("principal").or_store()?,
            verdict: {
                let v: String = row.try_get("verdict").or_store()?;
                StoredVerdict::parse(&v)
                    .ok_or_else(|| StoreError::corrupt(format!("unknown verdict `{v}`")))?
            },
            code: row.try_get("code").or_store()?,
            body,
        }))
    }

    /// How many transactions group commit needed for how many writes so far.
    pub fn group_commit_stats(&self) -> GroupCommitStats {
        self.group.stats()
    }

    /// The sqlx write connection at `synchronous = NORMAL`, for deletions that must survive a
    /// crash of the process but not necessarily a power cut (retention: a purge lost to a power
    /// cut is simply done again). The next acquire restores `FULL`.
    pub(crate) async fn relaxed_writer(
        &self,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>, StoreError> {
        let mut conn = self.writer.acquire().await.or_store()?;
        self.relaxed.store(true, Ordering::Release);
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await
            .or_store()?;
        Ok(conn)
    }

    /// The read pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The sqlx write connection, for the rare writes (the hot ones go to the write thread).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

#[cfg(test)]
mod durability_tests {
    use super::OrStore;
    use crate::{QueueStore, StoreError};

    /// The writer thread's connection: its `synchronous` level and whether a transaction is open.
    async fn state(store: &super::SqliteStore) -> (i64, bool) {
        store
            .write_thread()
            .call(false, |c| {
                let level: i64 = c
                    .query_row("PRAGMA synchronous", [], |r| r.get(0))
                    .or_store()?;
                Ok((level, c.is_autocommit()))
            })
            .await
            .unwrap()
    }

    /// Delivery bookkeeping runs at `synchronous = NORMAL`; whatever writes next (an acceptance)
    /// must find the connection back at `FULL` (2), with no transaction left open.
    #[tokio::test]
    async fn relaxed_bookkeeping_leaves_the_write_connection_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(&dir.path().join("p.db"))
            .await
            .unwrap();
        assert_eq!(state(&store).await, (2, true));
        store.lease_due("w", 0, 1000, 10).await.unwrap();
        assert_eq!(state(&store).await, (2, true));
        // A relaxed call that fails half-way through its transaction leaves nothing open and
        // the connection durable.
        let failed = store
            .write_thread()
            .call(true, |c| {
                assert_eq!(
                    c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
                        .or_store()?,
                    1
                );
                c.execute_batch("BEGIN IMMEDIATE; INSERT INTO no_such_table VALUES (1)")
                    .or_store()?;
                Ok::<_, StoreError>(())
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(state(&store).await, (2, true));
        store.lease_due("w", 0, 1000, 10).await.unwrap();
    }
}
