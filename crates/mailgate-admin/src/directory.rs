//! Directory administration over any [`Store`]: `apply`, `export`, and the small imperative edits
//! (`user suspend`, `key create`, ...). Every change is validated as a whole and committed in one
//! transaction against the generation it was computed from; a concurrent change makes it retry.
//! Each returns what it did; the caller says it (CLI) or answers it (admin API).

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use mailgate_core::directory::{
    AbuseState, ApiKey, Directory, Kind, Object, ServiceAccountKey, User, UserStatus,
};
use mailgate_core::orgfile::{OrgFile, Problem};
use mailgate_core::validate::validate;
use mailgate_gateway::CONFLICT_RETRIES;
use mailgate_store::{Changeset, Store, StoreError};

use crate::AdminError;

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
    for _ in 0..CONFLICT_RETRIES {
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
            // Another change committed first: read again and recompute on top of it; after the
            // last try, the same error however the race ended (it used to be the store's raw
            // conflict on the last try and this message otherwise).
            Err(StoreError::Conflict { .. }) => continue,
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

/// The directory in the directory-file format (secrets as hashes only).
pub async fn export(store: &dyn Store) -> Result<String, AdminError> {
    let snap = store.snapshot().await?;
    Ok(mailgate_core::orgfile::to_yaml(&snap.directory))
}

/// Applies an imperative edit: reads the directory, lets `f` change it, validates the result and
/// commits it, retrying if someone else changed the directory meanwhile (the gateway's one
/// implementation, shared with the doors' settings APIs).
pub async fn edit<T>(
    store: &dyn Store,
    actor: &str,
    f: impl FnMut(&mut Directory) -> Result<T, AdminError>,
) -> Result<T, AdminError> {
    mailgate_gateway::edit_directory(store, actor, f)
        .await
        .map_err(|e| match e {
            mailgate_gateway::EditError::Refused(e) => e,
            other => AdminError::Other(anyhow!(other.to_string())),
        })
}

fn user_mut<'a>(d: &'a mut Directory, email: &str) -> Result<&'a mut User, AdminError> {
    d.user_mut(email)
        .ok_or_else(|| AdminError::NoUser(email.to_owned()))
}

/// One change of the directory's audit log, as the CLI prints it and the admin API answers it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditLine {
    /// When it was committed (RFC 3339).
    pub at: String,
    /// Who made it (`cli:<user>`, `admin-api:<token>`, `sendgrid-api:<key id>`, ...).
    pub actor: String,
    /// `create`, `update` or `delete`.
    pub action: mailgate_store::AuditAction,
    /// The directory-file section of the object (`users`, `api_keys`, ...).
    pub kind: &'static str,
    /// The object's id.
    pub id: String,
    /// The directory generation the change made.
    pub generation: i64,
}

/// Who changed what in the directory, newest first, at most `limit` lines (never a secret: the
/// log keeps which object changed, not its body).
pub async fn audit(store: &dyn Store, limit: u32) -> Result<Vec<AuditLine>, AdminError> {
    Ok(store
        .audit_log(limit)
        .await?
        .into_iter()
        .map(|e| AuditLine {
            at: mailgate_core::engine::rfc3339_ms(u64::try_from(e.at_secs).unwrap_or(0) * 1000),
            actor: e.actor,
            action: e.action,
            kind: e.kind.section(),
            id: e.id,
            generation: e.generation,
        })
        .collect())
}

/// Every user, in the directory's order.
pub async fn users(store: &dyn Store) -> Result<Vec<User>, AdminError> {
    Ok(store.snapshot().await?.directory.users)
}

/// One user as an admin may see it: the password hash, if any, shows as `(set)`.
pub async fn user(store: &dyn Store, email: &str) -> Result<Option<User>, AdminError> {
    let snap = store.snapshot().await?;
    Ok(snap.directory.user(email).cloned().map(|mut u| {
        u.password_hash = u.password_hash.map(|_| "(set)".to_owned());
        u
    }))
}

/// Sets a user's status: `Suspended` (`user suspend`) or `Active` (`user unsuspend`, `user
/// approve`).
pub async fn set_user_status(
    store: &dyn Store,
    actor: &str,
    email: &str,
    status: UserStatus,
) -> Result<(), AdminError> {
    edit(store, actor, |d| {
        user_mut(d, email)?.status = status;
        Ok(())
    })
    .await
}

/// The shortest password `set_password` accepts.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Sets a user's password (stored as an Argon2 hash only).
pub async fn set_password(
    store: &dyn Store,
    actor: &str,
    email: &str,
    plain: &str,
) -> Result<(), AdminError> {
    if plain.len() < MIN_PASSWORD_CHARS {
        return Err(AdminError::Invalid(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    let hash = mailgate_auth::hash_password(plain)?;
    edit(store, actor, |d| {
        user_mut(d, email)?.password_hash = Some(hash.clone());
        Ok(())
    })
    .await
}

/// Revokes a user's sending after abuse or compromise (`account.sending_revoked`), with what was
/// seen (shown in refusals and explain).
pub async fn revoke_sending(
    store: &dyn Store,
    actor: &str,
    email: &str,
    evidence: &str,
) -> Result<(), AdminError> {
    edit(store, actor, |d| {
        let u = user_mut(d, email)?;
        u.abuse.state = AbuseState::Revoked;
        u.abuse.evidence = Some(evidence.to_owned());
        Ok(())
    })
    .await
}

/// Restores a user's sending after a revocation.
pub async fn restore_sending(
    store: &dyn Store,
    actor: &str,
    email: &str,
) -> Result<(), AdminError> {
    edit(store, actor, |d| {
        user_mut(d, email)?.abuse = Default::default();
        Ok(())
    })
    .await
}

/// What a new API key may do (`key create`).
#[derive(Debug, Clone, Default)]
pub struct NewApiKey {
    /// The user the key sends as.
    pub owner: String,
    /// A name for people.
    pub name: String,
    /// Permissions (e.g. `mail.send`).
    pub permissions: Vec<String>,
    /// Allowed client ranges; none means any.
    pub allowed_ips: Vec<ipnet::IpNet>,
    /// Allowed HTTP referrer patterns.
    pub allowed_referrers: Vec<String>,
    /// Allowed APIs (`gmail.googleapis.com`, `sendgrid.api`, `smtp`).
    pub allowed_apis: Vec<String>,
    /// Project (for API enablement checks).
    pub project: Option<String>,
    /// Expiry, RFC 3339.
    pub expires: Option<String>,
}

/// A key just created: its id, and the full secret, which exists nowhere else (only its SHA-256
/// is stored).
#[derive(Debug)]
pub struct CreatedApiKey {
    /// The key's id (`key list`, `key revoke`).
    pub id: String,
    /// The whole key, to hand to the client once.
    pub secret: String,
}

/// Creates an API key.
pub async fn create_api_key(
    store: &dyn Store,
    actor: &str,
    new: NewApiKey,
) -> Result<CreatedApiKey, AdminError> {
    let expires = new
        .expires
        .as_deref()
        .map(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| AdminError::Invalid(format!("--expires `{s}` is not RFC 3339")))
        })
        .transpose()?;
    let (id, full) = mailgate_auth::new_api_key()?;
    let key = ApiKey {
        id: id.clone(),
        name: new.name,
        secret: None,
        secret_sha256: mailgate_auth::sha256_hex(full.as_bytes()),
        owner: new.owner,
        project: new.project,
        permissions: new.permissions,
        allowed_ips: new.allowed_ips,
        allowed_referrers: new.allowed_referrers,
        allowed_apis: new.allowed_apis,
        expires,
        revoked: false,
    };
    edit(store, actor, |d| {
        d.api_keys.push(key.clone());
        Ok(())
    })
    .await?;
    Ok(CreatedApiKey { id, secret: full })
}

/// Every API key (their secrets are stored as hashes only).
pub async fn api_keys(store: &dyn Store) -> Result<Vec<ApiKey>, AdminError> {
    Ok(store.snapshot().await?.directory.api_keys)
}

/// Revokes an API key by id.
pub async fn revoke_api_key(store: &dyn Store, actor: &str, id: &str) -> Result<(), AdminError> {
    edit(store, actor, |d| {
        let k = d
            .api_keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| AdminError::NoApiKey(id.to_owned()))?;
        k.revoked = true;
        Ok(())
    })
    .await
}

/// A service-account key just created: its id and the Google-format JSON key file (holding the
/// private key, which exists nowhere else).
#[derive(Debug)]
pub struct CreatedServiceAccountKey {
    /// The key's id (`private_key_id`).
    pub id: String,
    /// The key file's contents, pretty-printed JSON.
    pub key_file: String,
}

/// Adds a key to a service account and returns its key file, whose URLs point at `public_url`
/// (the gateway's token endpoint, not Google's).
pub async fn create_service_account_key(
    store: &dyn Store,
    actor: &str,
    email: &str,
    public_url: &str,
) -> Result<CreatedServiceAccountKey, AdminError> {
    let pair = mailgate_auth::generate_service_account_key()?;
    let (project, client_id) = edit(store, actor, |d| {
        let sa = d
            .service_accounts
            .iter_mut()
            .find(|s| s.email.eq_ignore_ascii_case(email))
            .ok_or_else(|| AdminError::NoServiceAccount(email.to_owned()))?;
        sa.keys.push(ServiceAccountKey {
            id: pair.id.clone(),
            public_key_pem: pair.public_key_pem.clone(),
        });
        Ok((sa.project.clone(), sa.client_id.clone()))
    })
    .await?;
    let base = public_url;
    let file = serde_json::json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": pair.id,
        "private_key": pair.private_key_pem,
        "client_email": email,
        "client_id": client_id,
        "auth_uri": format!("{base}/o/oauth2/auth"),
        "token_uri": format!("{base}/token"),
        "auth_provider_x509_cert_url": format!("{base}/oauth2/v1/certs"),
        "client_x509_cert_url": format!("{base}/service_accounts/v1/metadata/x509/{email}"),
        "universe_domain": "googleapis.com",
    });
    Ok(CreatedServiceAccountKey {
        id: pair.id,
        key_file: serde_json::to_string_pretty(&file).map_err(anyhow::Error::new)?,
    })
}

/// Creates (or replaces) the admin API token `name` and returns it: only its SHA-256 is stored.
pub async fn create_admin_token(store: &dyn Store, name: &str) -> Result<String, AdminError> {
    let token = format!("mga_{}", mailgate_auth::random_token::<32>()?);
    store
        .add_admin_token(name, &mailgate_auth::sha256_hex(token.as_bytes()))
        .await?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const BASE: &str = "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n    password: \"pw-a-123456\"\n  - email: b@example.com\n";

    #[tokio::test]
    async fn apply_is_idempotent() {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        let first = apply(store.as_ref(), BASE, false, false, "t")
            .await
            .unwrap();
        assert_eq!(first.generation, 1);
        let second = apply(store.as_ref(), BASE, false, false, "t")
            .await
            .unwrap();
        assert!(second.changes.is_empty(), "{:?}", second.changes);
        assert_eq!(second.generation, 1);
    }

    #[tokio::test]
    async fn apply_without_prune_keeps_what_the_file_does_not_name() {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        apply(store.as_ref(), BASE, false, false, "t")
            .await
            .unwrap();
        let only_a = "users:\n  - email: a@example.com\n    status: suspended\n";
        apply(store.as_ref(), only_a, false, false, "t")
            .await
            .unwrap();
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
        let store = mailgate_store::in_memory().await.unwrap().directory;
        apply(store.as_ref(), BASE, false, false, "t")
            .await
            .unwrap();
        // Pruning the domain away leaves users whose domain is unknown: refused, nothing changes.
        let err = apply(
            store.as_ref(),
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
        let r = apply(store.as_ref(), ok, true, false, "t").await.unwrap();
        assert!(
            r.changes.iter().any(|c| c == "delete user b@example.com"),
            "{:?}",
            r.changes
        );
    }

    const WITH_SA: &str = "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\nprojects: [{id: p1, number: 1}]\nservice_accounts:\n  - email: robot@p1.iam.gserviceaccount.com\n    project: p1\n    client_id: \"1045\"\n";

    async fn store_with(src: &str) -> Arc<dyn Store> {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        apply(store.as_ref(), src, false, false, "t").await.unwrap();
        store
    }

    #[tokio::test]
    async fn unknown_names_are_errors_naming_the_list_command() {
        let store = store_with(BASE).await;
        let e = revoke_api_key(store.as_ref(), "t", "nope")
            .await
            .unwrap_err();
        assert!(
            matches!(e, AdminError::NoApiKey(ref id) if id == "nope"),
            "{e:?}"
        );
        assert!(e.to_string().contains("`mailgate key list`"), "{e}");
        let e = set_user_status(store.as_ref(), "t", "x@example.com", UserStatus::Suspended)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("`mailgate user list`"), "{e}");
        let e = create_service_account_key(store.as_ref(), "t", "x@example.com", "http://h")
            .await
            .unwrap_err();
        assert!(matches!(e, AdminError::NoServiceAccount(_)), "{e:?}");
        // Nothing was committed by the refusals.
        assert_eq!(store.generation().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn user_verbs_change_only_what_they_name() {
        let store = store_with(BASE).await;
        set_user_status(store.as_ref(), "t", "A@example.com", UserStatus::Suspended)
            .await
            .unwrap();
        revoke_sending(store.as_ref(), "t", "b@example.com", "spam run")
            .await
            .unwrap();
        let d = store.snapshot().await.unwrap().directory;
        let (a, b) = (
            d.user("a@example.com").unwrap(),
            d.user("b@example.com").unwrap(),
        );
        assert_eq!(a.status, UserStatus::Suspended);
        assert_eq!(a.abuse.state, AbuseState::Healthy);
        assert_eq!(b.status, UserStatus::Active);
        assert_eq!(b.abuse.state, AbuseState::Revoked);
        assert_eq!(b.abuse.evidence.as_deref(), Some("spam run"));
        restore_sending(store.as_ref(), "t", "b@example.com")
            .await
            .unwrap();
        set_user_status(store.as_ref(), "t", "a@example.com", UserStatus::Active)
            .await
            .unwrap();
        let d = store.snapshot().await.unwrap().directory;
        assert_eq!(d.user("a@example.com").unwrap().status, UserStatus::Active);
        assert_eq!(
            d.user("b@example.com").unwrap().abuse,
            Default::default(),
            "restore clears the evidence too"
        );
    }

    #[tokio::test]
    async fn passwords_are_checked_and_never_shown() {
        let store = store_with(BASE).await;
        let e = set_password(store.as_ref(), "t", "b@example.com", "short")
            .await
            .unwrap_err();
        assert!(matches!(e, AdminError::Invalid(_)), "{e:?}");
        assert_eq!(store.generation().await.unwrap(), 1);
        set_password(store.as_ref(), "t", "b@example.com", "long enough pw")
            .await
            .unwrap();
        let stored = store.snapshot().await.unwrap().directory;
        let hash = stored.user("b@example.com").unwrap().password_hash.clone();
        assert!(hash.is_some_and(|h| h.starts_with("$argon2")));
        let shown = user(store.as_ref(), "b@example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(shown.password_hash.as_deref(), Some("(set)"));
        assert!(
            user(store.as_ref(), "x@example.com")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn api_keys_store_only_a_hash_and_revoke_by_id() {
        let store = store_with(BASE).await;
        let bad = NewApiKey {
            owner: "a@example.com".into(),
            name: "ci".into(),
            expires: Some("tomorrow".into()),
            ..Default::default()
        };
        let e = create_api_key(store.as_ref(), "t", bad).await.unwrap_err();
        assert!(e.to_string().contains("not RFC 3339"), "{e}");
        let created = create_api_key(
            store.as_ref(),
            "t",
            NewApiKey {
                owner: "a@example.com".into(),
                name: "ci".into(),
                permissions: vec!["mail.send".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let keys = api_keys(store.as_ref()).await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id, created.id);
        assert_eq!(
            keys[0].secret_sha256,
            mailgate_auth::sha256_hex(created.secret.as_bytes())
        );
        assert!(keys[0].secret.is_none());
        assert!(
            !export(store.as_ref())
                .await
                .unwrap()
                .contains(&created.secret)
        );
        revoke_api_key(store.as_ref(), "t", &created.id)
            .await
            .unwrap();
        assert!(api_keys(store.as_ref()).await.unwrap()[0].revoked);
    }

    #[tokio::test]
    async fn service_account_key_files_point_at_this_gateway() {
        let store = store_with(WITH_SA).await;
        let k = create_service_account_key(
            store.as_ref(),
            "t",
            "robot@p1.iam.gserviceaccount.com",
            "https://mail.example",
        )
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&k.key_file).unwrap();
        assert_eq!(v["token_uri"], "https://mail.example/token");
        assert_eq!(v["private_key_id"], k.id.as_str());
        assert_eq!(v["project_id"], "p1");
        let d = store.snapshot().await.unwrap().directory;
        let sa = &d.service_accounts[0];
        assert_eq!(sa.keys.len(), 1);
        assert_eq!(sa.keys[0].id, k.id);
        assert!(!sa.keys[0].public_key_pem.contains("PRIVATE"));
    }

    #[tokio::test]
    async fn admin_tokens_are_stored_as_hashes() {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        let t = create_admin_token(store.as_ref(), "ops").await.unwrap();
        assert!(t.starts_with("mga_"));
        let hash = mailgate_auth::sha256_hex(t.as_bytes());
        assert_eq!(
            store.admin_token(&hash).await.unwrap().as_deref(),
            Some("ops")
        );
        let again = create_admin_token(store.as_ref(), "ops").await.unwrap();
        assert_ne!(again, t);
    }
}
