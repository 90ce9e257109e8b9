//! SQLite's errors mapped into the backend-neutral [`StoreError`], by meaning: disk full, busy,
//! unavailable, corrupt, a schema newer than this binary. The SQLite code writes `.or_store()?`
//! where it once relied on `From` conversions, so `StoreError` itself names no database crate.

use crate::StoreError;

/// Converts a database crate's result into the store's.
pub(crate) trait OrStore<T> {
    /// The same result with the error mapped into a [`StoreError`].
    fn or_store(self) -> Result<T, StoreError>;
}

impl<T> OrStore<T> for Result<T, sqlx::Error> {
    fn or_store(self) -> Result<T, StoreError> {
        self.map_err(|e| from_sqlx(&e))
    }
}

impl<T> OrStore<T> for Result<T, rusqlite::Error> {
    fn or_store(self) -> Result<T, StoreError> {
        self.map_err(|e| from_rusqlite(&e))
    }
}

impl<T> OrStore<T> for Result<T, sqlx::migrate::MigrateError> {
    fn or_store(self) -> Result<T, StoreError> {
        self.map_err(|e| from_migrate(&e))
    }
}

impl<T> OrStore<T> for Result<T, serde_json::Error> {
    fn or_store(self) -> Result<T, StoreError> {
        self.map_err(StoreError::corrupt)
    }
}

/// SQLite's primary result codes (the low byte of an extended code).
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_IOERR: i64 = 10;
const SQLITE_CORRUPT: i64 = 11;
const SQLITE_FULL: i64 = 13;
const SQLITE_CANTOPEN: i64 = 14;
const SQLITE_NOTADB: i64 = 26;

/// `ENOSPC`: no space left on the device.
const ENOSPC: i32 = 28;

/// What an SQLite result code means to a caller.
fn from_code(code: i64, text: String) -> StoreError {
    match code & 0xff {
        SQLITE_FULL => StoreError::Full(text),
        SQLITE_BUSY | SQLITE_LOCKED => StoreError::Busy(text),
        SQLITE_IOERR | SQLITE_CANTOPEN => StoreError::Unavailable(text),
        SQLITE_CORRUPT | SQLITE_NOTADB => StoreError::Corrupt(text),
        _ => StoreError::Other(text),
    }
}

fn from_io(e: &std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull {
        StoreError::Full(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// An sqlx error (reads, rare writes, migrations).
pub(crate) fn from_sqlx(e: &sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match e {
        E::Database(db) => match db.code().and_then(|c| c.parse::<i64>().ok()) {
            Some(code) => from_code(code, db.message().to_owned()),
            None => StoreError::Other(db.message().to_owned()),
        },
        E::Io(io) => from_io(io),
        E::PoolTimedOut => StoreError::Busy(e.to_string()),
        E::PoolClosed | E::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        E::RowNotFound => StoreError::NotFound(e.to_string()),
        E::Decode(_)
        | E::ColumnDecode { .. }
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::TypeNotFound { .. }
        | E::Protocol(_) => StoreError::Corrupt(e.to_string()),
        E::Migrate(m) => from_migrate(m),
        _ => StoreError::Other(e.to_string()),
    }
}

/// An error of the write thread's connection.
pub(crate) fn from_rusqlite(e: &rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match e {
        E::SqliteFailure(f, msg) => from_code(
            i64::from(f.extended_code),
            msg.clone().unwrap_or_else(|| f.to_string()),
        ),
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..)
        | E::InvalidColumnIndex(_)
        | E::InvalidColumnName(_) => StoreError::Corrupt(e.to_string()),
        E::QueryReturnedNoRows => StoreError::NotFound(e.to_string()),
        _ => StoreError::Other(e.to_string()),
    }
}

/// A failed migration: a schema newer than this binary is told apart.
pub(crate) fn from_migrate(e: &sqlx::migrate::MigrateError) -> StoreError {
    crate::migrations::from_migrate(e, from_sqlx)
}

/// The write thread could not be started or has stopped.
pub(crate) fn thread_gone(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_codes_map_by_meaning() {
        assert!(matches!(from_code(13, "x".into()), StoreError::Full(_)));
        // Extended codes keep their primary meaning (SQLITE_BUSY_SNAPSHOT, SQLITE_IOERR_WRITE).
        assert!(matches!(from_code(517, "x".into()), StoreError::Busy(_)));
        assert!(matches!(
            from_code(778, "x".into()),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(from_code(11, "x".into()), StoreError::Corrupt(_)));
        assert!(matches!(from_code(19, "x".into()), StoreError::Other(_)));
        let full = std::io::Error::from_raw_os_error(ENOSPC);
        assert!(matches!(
            from_sqlx(&sqlx::Error::Io(full)),
            StoreError::Full(_)
        ));
        assert!(matches!(
            from_migrate(&sqlx::migrate::MigrateError::VersionMissing(99)),
            StoreError::SchemaTooNew(_)
        ));
        assert!(matches!(
            from_sqlx(&sqlx::Error::PoolTimedOut),
            StoreError::Busy(_)
        ));
    }

    #[test]
    fn a_full_disk_on_the_write_thread_is_full() {
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(13),
            Some("database or disk is full".into()),
        );
        let mapped = from_rusqlite(&e);
        assert_eq!(mapped, StoreError::Full("database or disk is full".into()));
        assert!(mapped.is_temporary());
    }
}
