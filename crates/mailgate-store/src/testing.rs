//! Test stores on the backend a test run asks for (cargo feature `testing`, a dev-dependency
//! feature of the crates whose tests use it): [`fresh_store`] gives a test a private, empty store,
//! SQLite by default and a PostgreSQL database of its own when `MAILGATE_TEST_STORE=postgres`
//! (`scripts/test`'s PostgreSQL pass), so one test runs unchanged on both backends. [`TestDb`] is
//! the PostgreSQL database alone, for tests that open it themselves (several nodes on one
//! database, a `[store] url` in a config file).
//!
//! The databases are made on the server `MAILGATE_TEST_POSTGRES` names (its maintenance database;
//! default `postgres://postgres@127.0.0.1:5432/postgres`, the machines' trust-auth server that
//! `scripts/test` starts when it is down), named `mailgate_test_<unix seconds>_<random>`, and
//! dropped when their [`TestDb`] drops, also when the test panics.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

use crate::Stores;

/// The variable naming the backend of a test run: `postgres`, or `sqlite` (the default).
pub const STORE_VAR: &str = "MAILGATE_TEST_STORE";

/// The variable naming the PostgreSQL server test databases are made on.
pub const SERVER_VAR: &str = "MAILGATE_TEST_POSTGRES";

/// How old a test database must be before [`TestDb::create`] drops it as left behind by a test
/// process that was killed (a nextest timeout sends a signal, and no destructor runs).
pub const STALE_SECS: u64 = 2 * 3600;

const PREFIX: &str = "mailgate_test_";

/// Whether this run puts the tests' stores on PostgreSQL: `MAILGATE_TEST_STORE=postgres`; unset,
/// empty or `sqlite`, SQLite. Any other value is a mistake in the run, and panics.
pub fn postgres_requested() -> bool {
    match std::env::var(STORE_VAR).as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Ok("") | Err(_) => false,
        Ok(other) => panic!("{STORE_VAR}={other:?}: expected `sqlite` or `postgres`"),
    }
}

/// The PostgreSQL server the test databases are made on: `MAILGATE_TEST_POSTGRES`, default the
/// local trust-auth server.
pub fn postgres_server() -> String {
    std::env::var(SERVER_VAR)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A private, empty store on the backend this run asks for ([`postgres_requested`]): an SQLite
/// store of its own ([`crate::in_memory`]), or a fresh PostgreSQL database ([`TestDb`]) opened
/// and migrated through [`crate::open`], as `serve` opens it. Keep the guard for as long as the
/// store is used: dropping it drops the database (`None` on SQLite). Panics when the store cannot
/// be made (a test cannot go on without it).
pub async fn fresh_store() -> (Stores, Option<TestDb>) {
    if !postgres_requested() {
        let stores = crate::in_memory()
            .await
            .unwrap_or_else(|e| panic!("an SQLite test store: {e}"));
        return (stores, None);
    }
    let db = TestDb::create().await;
    let stores = db.open().await;
    (stores, Some(db))
}

/// A PostgreSQL database of one test's own, dropped (`WITH (FORCE)`: connections still open are
/// cut off) when this value drops, also while the test unwinds from a panic.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// Creates a fresh, empty database on [`postgres_server`] (no schema until it is opened).
    /// First drops the test databases older than [`STALE_SECS`]. Panics when the server cannot
    /// be reached, saying which server the test needs.
    pub async fn create() -> TestDb {
        let server = postgres_server();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let name = format!("{PREFIX}{now}_{:016x}", fastrand::u64(..));
        let made = async {
            let mut admin = PgConnection::connect(&server).await?;
            drop_stale(&mut admin, now).await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut admin)
                .await?;
            let _ = admin.close().await;
            Ok::<_, sqlx::Error>(())
        };
        if let Err(e) = made.await {
            panic!("PostgreSQL at {server} ({SERVER_VAR}) is needed by this test: {e}");
        }
        TestDb {
            url: with_database(&server, &name),
            name,
        }
    }

    /// [`TestDb::create`] for synchronous code, inside a runtime or not (it runs on a thread of
    /// its own).
    pub fn create_blocking() -> TestDb {
        let made = std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(TestDb::create()))
        })
        .join();
        match made {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => panic!("a runtime to create the test database: {e}"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Its name on the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL, as `[store] url`, `--database-url` or [`crate::open`] take it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens it through [`crate::open`] (migrating it the first time), as another node would:
    /// each call is a store of its own on the same database.
    pub async fn open(&self) -> Stores {
        crate::open(&self.url)
            .await
            .unwrap_or_else(|e| panic!("open the test database {}: {e}", self.name))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime (or while it unwinds): the database is dropped
        // from a thread with a runtime of its own, waited for.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&postgres_server()).await?;
                drop_database(&mut admin, &name).await?;
                admin.close().await
            })
            .map_err(|e| e.to_string())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop test database {}: the thread panicked",
                self.name
            ),
        }
    }
}

async fn drop_database(admin: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(admin)
    .await
    .map(|_| ())
}

/// Drops the test databases made more than [`STALE_SECS`] before `now_secs` (best effort: errors
/// are ignored, another test may be dropping the same one).
async fn drop_stale(admin: &mut PgConnection, now_secs: u64) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT datname::text FROM pg_database WHERE starts_with(datname::text, $1)",
    )
    .bind(PREFIX)
    .fetch_all(&mut *admin)
    .await
    else {
        return;
    };
    for name in names {
        let made = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .and_then(|(secs, _)| secs.parse::<u64>().ok());
        if made.is_some_and(|t| t + STALE_SECS < now_secs) {
            let _ = drop_database(admin, &name).await;
        }
    }
}

/// `url` with its database name replaced by `db` (its query string kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|j| start + j))
        .unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_test_database_url_keeps_the_servers_authority_and_options() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5433/postgres?sslmode=disable", "t1"),
            "postgres://u:p@db:5433/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://db", "t1"), "postgres://db/t1");
    }
}
