//! The store's one error type, by meaning rather than by database: every backend maps its own
//! errors into it at its edge (`sqlite/error.rs` for SQLite), so nothing above the store names a
//! database crate and a second backend changes no caller.

/// A fault in the store (not a refusal: refusals are values of the decision engine).
///
/// Callers distinguish what they act on: [`StoreError::Conflict`] (read again and retry) and
/// [`StoreError::is_temporary`] (answer "try again later"); every other variant is a fault to
/// report. New variants may be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or read and written (connection refused or lost, an I/O
    /// error, the write thread gone). Temporary.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database is busy (locked by another writer past the wait, no free connection).
    /// Temporary.
    #[error("the store is busy: {0}")]
    Busy(String),
    /// The disk (or the database's quota) is full. Temporary: it passes when there is room.
    #[error("the store's disk is full: {0}")]
    Full(String),
    /// Someone else changed the directory since it was read; read it again and retry.
    #[error("the directory changed concurrently (expected generation {expected}, found {found})")]
    Conflict {
        /// The generation the writer read.
        expected: i64,
        /// The generation found at write time.
        found: i64,
    },
    /// A row the operation needs does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The store holds something this binary cannot read (a stored object that does not parse,
    /// an unknown state, a damaged database file).
    #[error("the store holds data it cannot read: {0}")]
    Corrupt(String),
    /// The database's schema is newer than this binary knows (a newer Mailgate migrated it).
    #[error("the database schema is newer than this Mailgate: {0}; run the newer Mailgate")]
    SchemaTooNew(String),
    /// Any other fault (a bug, a constraint violated).
    #[error("database error: {0}")]
    Other(String),
}

impl StoreError {
    /// True when trying again later may succeed (unavailable, busy, disk full): the doors answer
    /// with a temporary refusal.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Busy(_) | StoreError::Full(_)
        )
    }

    /// A stored value that does not read back.
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(what.to_string())
    }
}

impl From<mailgate_core::directory::ObjectError> for StoreError {
    fn from(e: mailgate_core::directory::ObjectError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::StoreError;

    #[test]
    fn only_unavailable_busy_and_full_are_temporary() {
        for e in [
            StoreError::Unavailable("x".into()),
            StoreError::Busy("x".into()),
            StoreError::Full("x".into()),
        ] {
            assert!(e.is_temporary(), "{e}");
        }
        for e in [
            StoreError::Conflict {
                expected: 1,
                found: 2,
            },
            StoreError::NotFound("x".into()),
            StoreError::Corrupt("x".into()),
            StoreError::SchemaTooNew("x".into()),
            StoreError::Other("x".into()),
        ] {
            assert!(!e.is_temporary(), "{e}");
        }
    }
}
