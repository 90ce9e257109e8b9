//! What the two sqlx backends share about migrations: a failed migration mapped into
//! [`StoreError`], a schema newer than this binary told apart (`SchemaTooNew`).

use crate::StoreError;

/// A failed migration; `from_sqlx` is the backend's own mapping of the statement's error.
pub(crate) fn from_migrate(
    e: &sqlx::migrate::MigrateError,
    from_sqlx: fn(&sqlx::Error) -> StoreError,
) -> StoreError {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::VersionMissing(v) => StoreError::SchemaTooNew(format!(
            "the database has migration {v}, which this binary does not know"
        )),
        M::Execute(inner) => from_sqlx(inner),
        M::ExecuteMigration(inner, v) => match from_sqlx(inner) {
            StoreError::Other(text) => StoreError::Other(format!("migration {v}: {text}")),
            mapped => mapped,
        },
        _ => StoreError::Other(format!("cannot migrate the database: {e}")),
    }
}
