//! The suite on the embedded SQLite store: one database file in a temporary directory of its own
//! per test, opened as many times as the contract asks (each open is what another process on the
//! same file gets: its own connections and write thread).

use std::path::PathBuf;

use mailgate_store::Stores;

use crate::suite::{Backend, conformance};

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
}

conformance!(fresh);
