//! [`JobStore`] on PostgreSQL: `pg_try_advisory_lock` on a connection taken out of the pool and
//! held by the guard for the job's duration. The lock is the session's: it ends when the guard
//! drops (the connection closes) or when the node dies (the server ends its session), so a job
//! is never held by a node that is gone.

use async_trait::async_trait;
use sqlx::Connection;

use super::{OrStore, PgStore};
use crate::StoreError;
use crate::jobs::{JobGuard, JobStore, job_key};

/// The connection holding a job's lock (closed when dropped).
struct Held(Option<sqlx::PgConnection>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Closing says goodbye to the server (which releases the lock at once); a dropped
            // socket is noticed by the server too, just later.
            rt.spawn(async move {
                let _ = conn.close().await;
            });
        }
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn try_job(&self, job: &str) -> Result<Option<JobGuard>, StoreError> {
        let mut conn = self.pool().acquire().await.or_store()?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(job_key(job))
            .fetch_one(&mut conn)
            .await
            .or_store()?;
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(JobGuard::holding(Some(Box::new(Held(Some(conn)))))))
    }
}
