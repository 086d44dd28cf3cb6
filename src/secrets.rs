//! Files that hold secrets (htpasswd, admin token, CA key): refused when other users can read
//! them, and never echoed into a log line or error.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Err when the file is readable or writable by "other" (mode & 0o006).
pub fn refuse_world_readable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o006 != 0 {
        return Err(format!(
            "{}: holds secrets but is accessible to other users (mode {:o}); chmod o-rwx it",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

/// A one-line secret (a token), after the permission check; surrounding whitespace trimmed.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    refuse_world_readable(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(t.to_string())
}
