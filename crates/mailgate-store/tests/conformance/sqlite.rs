//! The suite on the embedded SQLite store: one database file in a temporary directory of its own
//! per test, opened as many times as the contract asks (each open is what another process on the
//! same file gets: its own connections and write thread).

use std::path::PathBuf;

use mailgate_store::Stores;

use crate::suite::{AuditRow, Backend, conformance};

/// A fresh SQLite database.
pub struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn path(&self) -> PathBuf {
        self.dir.path().join("mailgate.db")
    }
}

/// A new, empty database (nothing is created until the first open).
async fn fresh() -> Sqlite {
    Sqlite {
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Backend for Sqlite {
    /// Through the factory `serve` and the admin verbs use.
    async fn open(&self) -> Stores {
        mailgate_store::open(&format!("sqlite://{}", self.path().display()))
            .await
            .unwrap()
    }

    async fn audit(&self) -> Vec<AuditRow> {
        let path = self.path();
        tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut rows = conn
                .prepare(
                    "SELECT actor, action, kind, id, generation FROM directory_audit ORDER BY rowid",
                )
                .unwrap();
            rows.query_map([], |r| {
                Ok(AuditRow {
                    actor: r.get(0)?,
                    action: r.get(1)?,
                    kind: r.get(2)?,
                    id: r.get(3)?,
                    generation: r.get(4)?,
                })
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
        })
        .await
        .unwrap()
    }
}

conformance!(fresh);
