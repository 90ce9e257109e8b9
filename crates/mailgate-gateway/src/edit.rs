//! Changing the directory from a running gateway (and from the CLI): read, change, validate the
//! whole result, commit against the generation read, retry if someone else changed it meanwhile.
//! One implementation, so the admin CLI and a door's settings API keep the same guarantees.

use mailgate_core::directory::Directory;
use mailgate_core::validate::{Issue, validate};
use mailgate_store::{Changeset, Store, StoreError};

/// How often a change computed against a stale directory is recomputed before giving up: the one
/// bound for every directory writer (`edit_directory` here, `mailgate apply` in mailgate-admin).
pub const CONFLICT_RETRIES: usize = 5;

/// Why an edit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EditError<E> {
    /// The edit function refused (its own reason).
    #[error("{0}")]
    Refused(E),
    /// The result would be inconsistent; nothing was changed.
    #[error("the change would leave the directory inconsistent: {}", issues_text(.0))]
    Invalid(Vec<Issue>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The directory kept changing under us.
    #[error("the directory kept changing; try again")]
    Busy,
}

fn issues_text(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("{}: {}", i.path(), i.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Applies `f` to the directory and commits the result in one transaction; returns once the
/// change is live on every running gateway node ([`crate::nodes::wait_until_live`]).
pub async fn edit_directory<T, E>(
    store: &dyn Store,
    actor: &str,
    mut f: impl FnMut(&mut Directory) -> Result<T, E>,
) -> Result<T, EditError<E>> {
    for _ in 0..CONFLICT_RETRIES {
        let snap = store.snapshot().await?;
        let mut dir = snap.directory.clone();
        let out = f(&mut dir).map_err(EditError::Refused)?;
        let issues = validate(&dir, &Default::default());
        if !issues.is_empty() {
            return Err(EditError::Invalid(issues));
        }
        let changes = Changeset::between(&snap.directory, &dir);
        match store.commit(snap.generation, &changes, actor).await {
            Ok(generation) => {
                crate::nodes::wait_and_report(store, generation).await;
                return Ok(out);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(EditError::Busy)
}
