//! This node's identity (`[node] id`): the name its delivery workers' leases carry
//! (`<node id>/<run>/<worker>`, `mailgate_store::lease_owner`), so that a node that starts again
//! takes back its own leases at once instead of waiting `relay.lease_ms` for them to expire. Set
//! in the config, or derived once (host name and a random suffix) and kept in
//! `<data dir>/node-id`, read back on every later start. Two nodes running at once must not share
//! an id: each would take back the other's leases when it starts.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The file in the data directory that keeps a derived node id.
pub const NODE_ID_FILE: &str = "node-id";

/// The longest node id.
const MAX_LEN: usize = 64;

/// `[node]` as the file says it (every key optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    /// This node's id (default: derived and kept in the data directory).
    id: Option<String>,
}

impl RawNode {
    /// `[node] id`, checked, when the file sets it.
    pub fn resolve(self) -> anyhow::Result<Option<String>> {
        match self.id {
            Some(id) => {
                check(&id).map_err(|why| anyhow::anyhow!("node.id = {id:?}: {why}"))?;
                Ok(Some(id))
            }
            None => Ok(None),
        }
    }
}

/// Why `id` is not a node id, if it is not: 1 to 64 ASCII letters, digits, `.`, `_` or `-`
/// (no `/`: it separates the parts of a lease owner).
fn check(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_LEN {
        return Err(format!("a node id is 1 to {MAX_LEN} characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits, `.`, `_` and `-` only)"
        ));
    }
    Ok(())
}

/// This node's id: `configured` (`[node] id`) when set, else the one kept in
/// `<data_dir>/node-id`, derived and written (mode 0600, atomically) on the first start.
pub fn node_id(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_owned());
    }
    let path = data_dir.join(NODE_ID_FILE);
    match read(&path)? {
        Some(id) => Ok(id),
        None => {
            create(&path, &derive()?)?;
            read(&path)?.with_context(|| format!("{} vanished once written", path.display()))
        }
    }
}

/// The id kept in `path`, or `None` when there is no such file.
fn read(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            if let Err(why) = check(id) {
                bail!(
                    "{} holds {id:?}, not a node id ({why}): correct it, or delete it to derive a new one",
                    path.display()
                );
            }
            Ok(Some(id.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes `id` to `path` unless a file is there already (another process starting on the same
/// data directory won the race; its id is the one read back): a new private file beside it,
/// synced, then linked into place, which never replaces an existing file.
fn create(path: &Path, id: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{NODE_ID_FILE}.{}.tmp",
        mailgate_auth::random_token::<6>().unwrap_or_default()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{id}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        });
    let _ = std::fs::remove_file(&tmp);
    written.with_context(|| format!("cannot write {}", path.display()))?;
    // The new name is durable with the directory.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A new node id: this host's name (its letters, digits and `-`, lower case, at most 40) and 8
/// random hex digits, so that two data directories on one host get two ids.
fn derive() -> anyhow::Result<String> {
    let host: String = mailgate_gateway::nodes::NodeIdentity::current()
        .host
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let host = host.trim_matches('-');
    let host = if host.is_empty() { "node" } else { host };
    let random = mailgate_auth::random_bytes::<4>()
        .map_err(|e| anyhow::anyhow!("cannot derive a node id: {e}"))?;
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{host}-{suffix}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_derived_id_is_kept_private_and_read_back_on_the_next_start() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let first = node_id(None, dir.path()).unwrap();
        assert!(check(&first).is_ok(), "{first}");
        let file = dir.path().join(NODE_ID_FILE);
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(node_id(None, dir.path()).unwrap(), first);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [NODE_ID_FILE]);
        // Another data directory (on this host) is another node.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(node_id(None, other.path()).unwrap(), first);
    }

    #[test]
    fn a_configured_id_wins_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            node_id(Some("mx-1.eu_west"), dir.path()).unwrap(),
            "mx-1.eu_west"
        );
        assert!(!dir.path().join(NODE_ID_FILE).exists());
        let raw: RawNode = toml::from_str("id = \"mx-1\"").unwrap();
        assert_eq!(raw.resolve().unwrap().as_deref(), Some("mx-1"));
        let long = "x".repeat(65);
        for bad in ["", "a/b", "a b", "é", long.as_str()] {
            let raw = RawNode {
                id: Some(bad.to_owned()),
            };
            let err = raw.resolve().unwrap_err().to_string();
            assert!(err.starts_with("node.id = "), "{err}");
        }
    }

    #[test]
    fn a_damaged_id_file_is_an_error_naming_it_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_ID_FILE), "two words\n").unwrap();
        let err = node_id(None, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(NODE_ID_FILE) && err.contains("delete it"),
            "{err}"
        );
        std::fs::write(dir.path().join(NODE_ID_FILE), "kept-id\n").unwrap();
        assert_eq!(node_id(None, dir.path()).unwrap(), "kept-id");
    }
}
