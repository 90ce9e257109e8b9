//! Files Mailgate creates hold secrets (the database: message bodies, password hashes; key files;
//! demo credentials), so they are private to the owner: the process runs with umask 077 (SQLite's
//! database, `-wal` and `-shm` are created 0600, the data directory 0700), files from before are
//! narrowed at start, and secret files are written to a new file and renamed into place (never
//! through an existing file or a symlink at the target).

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// Makes every file and directory the process creates private to its owner.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
}

/// Narrows the data directory to 0700 and the SQLite database files (when the store is one) to
/// 0600 (an installation from before this rule had them 0755/0644).
pub fn secure_data_dir(dir: &Path, db: Option<&Path>) {
    use std::os::unix::fs::PermissionsExt as _;
    let narrow = |p: &Path, mode: u32| {
        if let Ok(meta) = std::fs::symlink_metadata(p)
            && meta.is_file() == (mode == 0o600)
            && meta.permissions().mode() & 0o077 != 0
            && let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot make this file private");
        }
    };
    narrow(dir, 0o700);
    let Some(db) = db else { return };
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        narrow(&db.with_file_name(format!("{name}{suffix}")), 0o600);
    }
}

/// Writes `data` to `path` readable by its owner only: a new file (exclusive create, mode 0600,
/// never following a symlink) beside it, synced, then renamed over `path`. An existing `path`
/// (or a symlink there) is replaced, not written through: its mode and owner do not carry over.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        mailgate_auth::random_token::<8>().unwrap_or_default()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one and fits the connection caps inside it, so
/// that the caps (answered in each protocol) and not the kernel (`accept` failing on every
/// listener at once) are what refuses clients. Returns the limits in force.
pub fn fit_open_files(
    limits: &mailgate_gateway::budget::Limits,
) -> mailgate_gateway::budget::Limits {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (l.current, l.maximum)
        && cur < max
    {
        l.current = Some(max);
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let have = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    fit_caps(limits, have)
}

/// Open files kept for everything but client connections (store, smarthosts, logs).
const RESERVED_FILES: u64 = 256;

fn fit_caps(
    limits: &mailgate_gateway::budget::Limits,
    open_files: u64,
) -> mailgate_gateway::budget::Limits {
    let mut fitted = limits.clone();
    // Two HTTP listeners and three SMTP ones at most.
    let conns = (2 * limits.http_max_connections + 3 * limits.smtp_max_connections) as u64;
    let room = open_files.saturating_sub(RESERVED_FILES).max(50);
    if conns <= room {
        return fitted;
    }
    let scale = |n: usize| ((n as u64 * room / conns) as usize).max(5);
    fitted.http_max_connections = scale(limits.http_max_connections);
    fitted.smtp_max_connections = scale(limits.smtp_max_connections);
    fitted.http_max_connections_per_ip = limits
        .http_max_connections_per_ip
        .min(fitted.http_max_connections);
    fitted.smtp_max_connections_per_ip = limits
        .smtp_max_connections_per_ip
        .min(fitted.smtp_max_connections);
    tracing::warn!(
        open_files,
        http_max_connections = fitted.http_max_connections,
        smtp_max_connections = fitted.smtp_max_connections,
        "the open-file limit is below what [limits] allows: connection caps lowered to fit (raise `ulimit -n` to keep them)"
    );
    fitted
}

/// Reads a file, or standard input for `-`.
pub(crate) fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn connection_caps_fit_inside_the_open_file_limit() {
        let d = mailgate_gateway::budget::Limits::default();
        let fitted = fit_caps(&d, 1024);
        let total = 2 * fitted.http_max_connections + 3 * fitted.smtp_max_connections;
        assert!(total as u64 <= 1024 - RESERVED_FILES, "{total}");
        assert!(fitted.http_max_connections_per_ip <= fitted.http_max_connections);
        let roomy = fit_caps(&d, 1 << 20);
        assert_eq!(roomy.http_max_connections, d.http_max_connections);
    }

    #[test]
    fn a_private_file_replaces_a_symlink_and_an_open_file_instead_of_writing_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = d.path().join("key.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        write_private(&link, b"secret").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // An existing world-readable file becomes 0600.
        write_private(&victim, b"new").unwrap();
        let meta = std::fs::metadata(&victim).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "new");
    }
}
