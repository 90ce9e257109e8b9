//! PostgreSQL's errors mapped into the backend-neutral [`StoreError`], by meaning (SQLSTATE
//! classes): unreachable or shutting down is unavailable, contention (serialization failures,
//! deadlocks, lock and statement timeouts, no free connection) is busy, a full disk is full,
//! damaged data is corrupt, a migration this binary does not know is a schema too new. The
//! PostgreSQL code writes `.or_store()?`, as the SQLite code does.

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

/// What a SQLSTATE means to a caller.
pub(crate) fn from_sqlstate(code: &str, text: String) -> StoreError {
    match code {
        // disk_full, insufficient_resources, out_of_memory: it passes when there is room.
        "53100" => StoreError::Full(text),
        // too_many_connections, out_of_memory, serialization_failure, deadlock_detected,
        // lock_not_available, query_canceled (a statement timeout): try again.
        "53300" | "53200" | "40001" | "40P01" | "55P03" | "57014" => StoreError::Busy(text),
        // data_corrupted, index_corrupted.
        "XX001" | "XX002" => StoreError::Corrupt(text),
        // The server is going away or not accepting connections (admin_shutdown,
        // crash_shutdown, cannot_connect_now), the database does not exist, the login failed.
        "57P01" | "57P02" | "57P03" | "3D000" => StoreError::Unavailable(text),
        _ => match code.get(..2) {
            // connection_exception, invalid_authorization_specification.
            Some("08" | "28") => StoreError::Unavailable(text),
            // insufficient_resources (other than the above).
            Some("53") => StoreError::Busy(text),
            _ => StoreError::Other(text),
        },
    }
}

/// An sqlx error.
pub(crate) fn from_sqlx(e: &sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match e {
        E::Database(db) => match db.code() {
            Some(code) => from_sqlstate(&code, db.message().to_owned()),
            None => StoreError::Other(db.message().to_owned()),
        },
        E::Io(_) | E::Tls(_) | E::PoolClosed | E::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        E::PoolTimedOut => StoreError::Busy(e.to_string()),
        E::RowNotFound => StoreError::NotFound(e.to_string()),
        E::Decode(_)
        | E::ColumnDecode { .. }
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        // A protocol error is a connection that went wrong, not stored data.
        E::Protocol(_) => StoreError::Unavailable(e.to_string()),
        E::Migrate(m) => from_migrate(m),
        _ => StoreError::Other(e.to_string()),
    }
}

/// A failed migration: a schema newer than this binary is told apart.
pub(crate) fn from_migrate(e: &sqlx::migrate::MigrateError) -> StoreError {
    crate::migrations::from_migrate(e, from_sqlx)
}

/// `url` with its password (in the user part or a `password=` parameter) replaced by `***`:
/// what an error may show of a database URL.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // The authority ends at the first '/'; its user part at the last '@' before that.
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _password)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let mut out = if scheme.is_empty() {
        format!("{authority}{path}")
    } else {
        format!("{scheme}://{authority}{path}")
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_by_meaning() {
        let m = |code: &str| from_sqlstate(code, "x".into());
        assert!(matches!(m("53100"), StoreError::Full(_)));
        for busy in ["40001", "40P01", "55P03", "57014", "53300"] {
            assert!(matches!(m(busy), StoreError::Busy(_)), "{busy}");
        }
        for gone in ["08006", "08001", "57P01", "57P03", "3D000", "28P01"] {
            assert!(matches!(m(gone), StoreError::Unavailable(_)), "{gone}");
        }
        assert!(matches!(m("XX001"), StoreError::Corrupt(_)));
        // A unique violation is a bug or a duplicate id, not something to retry.
        assert!(matches!(m("23505"), StoreError::Other(_)));
        assert!(!m("23505").is_temporary());
        assert!(matches!(
            from_sqlx(&sqlx::Error::PoolTimedOut),
            StoreError::Busy(_)
        ));
        assert!(matches!(
            from_migrate(&sqlx::migrate::MigrateError::VersionMissing(99)),
            StoreError::SchemaTooNew(_)
        ));
    }

    #[test]
    fn a_url_loses_its_password_and_keeps_the_rest() {
        assert_eq!(
            redact("postgres://mg:s3cret@db.example:5432/mail?sslmode=require"),
            "postgres://mg:***@db.example:5432/mail?sslmode=require"
        );
        assert_eq!(
            redact("postgres://mg@127.0.0.1/mail?password=s3cret&application_name=x"),
            "postgres://mg@127.0.0.1/mail?password=***&application_name=x"
        );
        assert_eq!(
            redact("postgresql://p%40ss:w@rd@h/db"),
            "postgresql://p%40ss:***@h/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        for url in [
            "postgres://u:hunter2@h/d",
            "postgres://u@h/d?PASSWORD=hunter2",
        ] {
            assert!(!redact(url).contains("hunter2"), "{url}");
        }
    }
}
