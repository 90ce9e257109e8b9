//! Periodic jobs run by one node at a time (issue 16 item 5): retention and any other sweep that
//! every node schedules but only one should run. A node asks to be "the one" before each run and
//! holds the returned [`JobGuard`] for the run's duration; the others skip that run.

use async_trait::async_trait;

use crate::StoreError;

/// Held while this node runs a job; dropping it lets another node run it.
pub struct JobGuard {
    _held: Option<Box<dyn Send + Sync>>,
}

impl JobGuard {
    /// A guard holding `held` until dropped (a backend's lock: a connection, ...).
    pub(crate) fn holding(held: Option<Box<dyn Send + Sync>>) -> JobGuard {
        JobGuard { _held: held }
    }
}

impl std::fmt::Debug for JobGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobGuard").finish_non_exhaustive()
    }
}

/// Where nodes agree who runs a periodic job.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// `Some` when this node may run `job` now (no other node holds it); the job is this node's
    /// until the guard drops, or until this node dies. SQLite serves one node: always `Some`.
    async fn try_job(&self, job: &str) -> Result<Option<JobGuard>, StoreError>;

    /// Whether [`JobStore::try_job`] excludes other nodes (false where there is only one).
    fn jobs_exclusive(&self) -> bool {
        true
    }
}

/// A job name's advisory-lock key: FNV-1a of the name, under a Mailgate prefix.
pub(crate) fn job_key(job: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "mailgate-job:".bytes().chain(job.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}
