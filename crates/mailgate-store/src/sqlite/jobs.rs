//! [`JobStore`] on SQLite: one node serves an SQLite file, so it is always the one.

use async_trait::async_trait;

use super::SqliteStore;
use crate::StoreError;
use crate::jobs::{JobGuard, JobStore};

#[async_trait]
impl JobStore for SqliteStore {
    async fn try_job(&self, _job: &str) -> Result<Option<JobGuard>, StoreError> {
        Ok(Some(JobGuard::holding(None)))
    }

    fn jobs_exclusive(&self) -> bool {
        false
    }
}
