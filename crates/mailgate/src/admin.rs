//! Directory administration over any [`Store`]: `apply`, `export`, and the small imperative edits
//! (`user suspend`, `key create`, ...). Every change is validated as a whole and committed in one
//! transaction against the generation it was computed from; a concurrent change makes it retry.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use mailgate_core::directory::{Directory, Kind, Object};
use mailgate_core::orgfile::{OrgFile, Problem};
use mailgate_core::validate::validate;
use mailgate_store::{Changeset, Store, StoreError};

/// How often a change computed against a stale directory is recomputed before giving up.
const CONFLICT_RETRIES: usize = 5;

/// Why `apply` refused a file.
#[derive(Debug)]
pub enum ApplyError {
    /// The file has problems; nothing was changed.
    Problems(Vec<Problem>),
    /// The store failed.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for ApplyError {
    fn from(e: anyhow::Error) -> Self {
        ApplyError::Other(e)
    }
}

/// What `apply` did (or would do, with `dry_run`).
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// `create`/`update`/`delete` lines, e.g. `update user alice@example.com (status: active ->
    /// suspended)`.
    pub changes: Vec<String>,
    /// The directory generation after the change.
    pub generation: i64,
}

/// Applies a directory file: creates or updates everything it names (and with `prune`, removes
/// what it does not name), all or nothing.
pub async fn apply(
    store: &dyn Store,
    src: &str,
    prune: bool,
    dry_run: bool,
    actor: &str,
) -> Result<ApplyReport, ApplyError> {
    let (file, parse_problems) = OrgFile::parse_lenient(src).map_err(ApplyError::Problems)?;
    for attempt in 0..CONFLICT_RETRIES {
        let snap = store.snapshot().await.map_err(|e| anyhow!(e))?;
        let mut incoming = file.directory.clone();
        let mut issues = mailgate_auth::prepare_secrets(&mut incoming, &snap.directory)
            .map_err(|e| anyhow!(e))?;
        let merged = merge(&snap.directory, &incoming, &file, prune)?;
        issues.extend(validate(&merged, &file.undecoded));
        let mut problems = parse_problems.clone();
        problems.extend(issues.iter().map(|i| file.problem_for(i)));
        if !problems.is_empty() {
            problems.sort_by_key(|p| (p.location.is_none(), p.location));
            problems.dedup();
            return Err(ApplyError::Problems(problems));
        }
        let changes = Changeset::between(&snap.directory, &merged);
        let report_lines = describe(&snap.directory, &changes);
        if dry_run {
            return Ok(ApplyReport {
                changes: report_lines,
                generation: snap.generation,
            });
        }
        match store.commit(snap.generation, &changes, actor).await {
            Ok(generation) => {
                // Live on every running server before `apply` returns.
                mailgate_gateway::nodes::wait_and_report(store, generation).await;
                return Ok(ApplyReport {
                    changes: report_lines,
                    generation,
                });
            }
            Err(StoreError::Conflict { .. }) if attempt + 1 < CONFLICT_RETRIES => continue,
            Err(e) => return Err(ApplyError::Other(anyhow!(e))),
        }
    }
    Err(ApplyError::Other(anyhow!(
        "the directory kept changing while applying; try again"
    )))
}

/// Merges a file into the current directory. Without `prune`, entries the file does not name are
/// kept and sections the file does not mention are left alone.
fn merge(
    current: &Directory,
    incoming: &Directory,
    file: &OrgFile,
    prune: bool,
) -> anyhow::Result<Directory> {
    if prune {
        return Ok(incoming.clone());
    }
    // Keep the stored order, replacing in place; new entries go at the end of their section.
    let mut objects: Vec<Object> = current.to_objects();
    let mut index: BTreeMap<(Kind, String), usize> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| ((o.kind, o.id.clone()), i))
        .collect();
    for o in incoming.to_objects() {
        if !file.sections.contains(&o.kind) {
            continue;
        }
        match index.get(&(o.kind, o.id.clone())) {
            Some(&i) => {
                if let Some(slot) = objects.get_mut(i) {
                    *slot = o;
                }
            }
            None => {
                index.insert((o.kind, o.id.clone()), objects.len());
                objects.push(o);
            }
        }
    }
    // Sort by kind so each section is contiguous (order within a section is preserved).
    objects.sort_by_key(|o| o.kind);
    Directory::from_objects(objects).context("merging the file into the stored directory")
}

/// One line per change, saying whether it creates, updates or deletes, and for an update which
/// fields change: `create org_unit /staff`, `update user x@example.com (status: active ->
/// suspended)`, `delete api_key k1`.
fn describe(current: &Directory, changes: &Changeset) -> Vec<String> {
    let old = current.to_objects();
    let mut out = Vec::new();
    for o in &changes.upserts {
        let what = object_name(o.kind, &o.id);
        match old.iter().find(|p| p.kind == o.kind && p.id == o.id) {
            None => out.push(format!("create {what}")),
            Some(prev) => {
                let fields = field_changes(&prev.body, &o.body);
                if fields.is_empty() {
                    out.push(format!("update {what}"));
                } else {
                    out.push(format!("update {what} ({})", fields.join(", ")));
                }
            }
        }
    }
    for (k, id) in &changes.deletes {
        out.push(format!("delete {}", object_name(*k, id)));
    }
    out
}

/// `user alice@example.com`, `org_unit /staff`, `organisation` (a singleton has no id).
fn object_name(kind: Kind, id: &str) -> String {
    let singular = match kind {
        Kind::Organisation => "organisation",
        Kind::Domain => "domain",
        Kind::OrgUnit => "org_unit",
        Kind::User => "user",
        Kind::Group => "group",
        Kind::Project => "project",
        Kind::OAuthClient => "oauth_client",
        Kind::ServiceAccount => "service_account",
        Kind::DelegationGrant => "domain_wide_delegation",
        Kind::ApiKey => "api_key",
        Kind::Role => "role",
        Kind::Policy => "policy",
        Kind::Limits => "limits",
        Kind::SmtpRelay => "smtp_relay",
        Kind::Smarthost => "smarthost",
    };
    if id.is_empty() {
        singular.to_owned()
    } else {
        format!("{singular} {id}")
    }
}

/// `field: old -> new` for each top-level field that differs (in the new object's order, then
/// the fields removed). Secrets and their hashes show as `(changed)`, never their values.
fn field_changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return Vec::new();
    };
    let keys = new
        .keys()
        .chain(old.keys().filter(|k| !new.contains_key(*k)));
    let mut out = Vec::new();
    for k in keys {
        let (a, b) = (old.get(k), new.get(k));
        if a == b {
            continue;
        }
        let secret = k.contains("secret") || k.contains("password") || k.contains("hash");
        if secret {
            out.push(format!("{k}: (changed)"));
        } else {
            out.push(format!("{k}: {} -> {}", shown(a), shown(b)));
        }
    }
    out
}

/// A field's value on one line: strings bare, lists and maps as compact JSON, long ones cut.
fn shown(v: Option<&serde_json::Value>) -> String {
    let s = match v {
        None => return "(not set)".to_owned(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// Prints the directory in the directory-file format (secrets as hashes only).
pub async fn export(store: &dyn Store) -> anyhow::Result<String> {
    let snap = store.snapshot().await?;
    Ok(mailgate_core::orgfile::to_yaml(&snap.directory))
}

/// Applies an imperative edit: reads the directory, lets `f` change it, validates the result and
/// commits it, retrying if someone else changed the directory meanwhile (the gateway's one
/// implementation, shared with the doors' settings APIs).
pub async fn edit<T>(
    store: &dyn Store,
    actor: &str,
    f: impl FnMut(&mut Directory) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    mailgate_gateway::edit_directory(store, actor, f)
        .await
        .map_err(|e| match e {
            mailgate_gateway::EditError::Refused(e) => e,
            other => anyhow!(other.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailgate_core::directory::UserStatus;
    use mailgate_store::SqliteStore;

    const BASE: &str = "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n    password: \"pw-a-123456\"\n  - email: b@example.com\n";

    #[tokio::test]
    async fn apply_is_idempotent() {
        let store = SqliteStore::in_memory().await.unwrap();
        let first = apply(&store, BASE, false, false, "t").await.unwrap();
        assert_eq!(first.generation, 1);
        let second = apply(&store, BASE, false, false, "t").await.unwrap();
        assert!(second.changes.is_empty(), "{:?}", second.changes);
        assert_eq!(second.generation, 1);
    }

    #[tokio::test]
    async fn apply_without_prune_keeps_what_the_file_does_not_name() {
        let store = SqliteStore::in_memory().await.unwrap();
        apply(&store, BASE, false, false, "t").await.unwrap();
        let only_a = "users:\n  - email: a@example.com\n    status: suspended\n";
        apply(&store, only_a, false, false, "t").await.unwrap();
        let d = store.snapshot().await.unwrap().directory;
        assert_eq!(d.users.len(), 2);
        assert_eq!(
            d.user("a@example.com").unwrap().status,
            UserStatus::Suspended
        );
        assert_eq!(d.domains.len(), 1);
    }

    #[tokio::test]
    async fn prune_removes_and_checks_references() {
        let store = SqliteStore::in_memory().await.unwrap();
        apply(&store, BASE, false, false, "t").await.unwrap();
        // Pruning the domain away leaves users whose domain is unknown: refused, nothing changes.
        let err = apply(
            &store,
            "users: [{email: a@example.com}]\n",
            true,
            false,
            "t",
        )
        .await
        .unwrap_err();
        let ApplyError::Problems(p) = err else {
            panic!()
        };
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].location.unwrap().line, 1);
        assert_eq!(store.generation().await.unwrap(), 1);
        let ok = "domains: [{name: example.com}]\nusers: [{email: a@example.com}]\n";
        let r = apply(&store, ok, true, false, "t").await.unwrap();
        assert!(
            r.changes.iter().any(|c| c == "delete user b@example.com"),
            "{:?}",
            r.changes
        );
    }
}
