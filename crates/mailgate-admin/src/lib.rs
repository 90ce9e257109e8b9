//! Mailgate's admin service: every administrative operation as a plain function over the store
//! traits, returning typed results and never printing. The CLI (`mailgate user suspend`, ...)
//! prints what these return; the admin HTTP API (`/mailgate/v1/...`) answers it as JSON; the web
//! console will call the same functions. One implementation, so the three cannot drift.
//!
//! - [`directory`]: `apply`, `export`, the imperative edits (users, API keys, service-account
//!   keys) and admin tokens, all validated and committed in one transaction.
//! - [`queue`]: the delivery queue (list, show, retry, delete) and captured mail.
//! - [`explain`]: explain requests, a dry run of the engine that evaluates every check.
//! - [`decisions`]: a stored decision as the admin API and the support bundle show it.
//! - [`status`]: the nodes serving from the store, their heartbeats and the leases they hold.
//! - [`faults`]: fault injection (`mailgate simulate`), and loading the faults in force into a
//!   gateway.

pub mod bundle;
pub mod decisions;
pub mod directory;
pub mod explain;
pub mod faults;
pub mod queue;
pub mod status;

pub use directory::{ApplyError, ApplyReport, apply, edit, export};

/// Why an admin operation was refused or failed. The messages are the CLI's and the admin API's
/// words: each names what is missing and, where there is one, the command that lists what exists.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No user with this address.
    #[error("no user `{0}` in the directory (see `mailgate user list`)")]
    NoUser(String),
    /// No API key with this id.
    #[error("no API key with id `{0}` (see `mailgate key list`)")]
    NoApiKey(String),
    /// No service account with this address.
    #[error("no service account `{0}` in the directory")]
    NoServiceAccount(String),
    /// The request itself is wrong (a short password, a date that is not RFC 3339, ...).
    #[error("{0}")]
    Invalid(String),
    /// The store or another layer failed.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<mailgate_store::StoreError> for AdminError {
    fn from(e: mailgate_store::StoreError) -> Self {
        AdminError::Other(anyhow::Error::new(e))
    }
}

impl From<mailgate_auth::AuthError> for AdminError {
    fn from(e: mailgate_auth::AuthError) -> Self {
        AdminError::Other(anyhow::Error::new(e))
    }
}
