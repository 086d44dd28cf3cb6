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

/// A URL for a log line or error: the password in its userinfo (`redis://:pw@host`,
/// `redis://user:pw@host`) replaced.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let (userinfo, host) = authority.split_at(at);
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let redacted = if userinfo.contains(':') {
        format!("{user}:REDACTED")
    } else {
        "REDACTED".to_string()
    };
    format!("{scheme}://{redacted}{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url_password("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://:REDACTED@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url_password("rediss://app:hunter2@redis:bad"),
            "rediss://app:REDACTED@redis:bad"
        );
        assert_eq!(
            redact_url_password("redis://tokenonly@redis"),
            "redis://REDACTED@redis"
        );
        assert_eq!(
            redact_url_password("redis://redis:6379"),
            "redis://redis:6379"
        );
    }
}
