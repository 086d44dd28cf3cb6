//! Configuration: read the TOML files (following `include`), then one validation pass that
//! compiles them into runtime [`Settings`] and an immutable [`Policy`]. Every error names
//! `FILE:LINE:COL`.

mod compile;
pub mod types;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustc_hash::FxHashMap;

use crate::policy::{Host, Policy};
use types::{ConfigFile, S};

/// The shipped default, embedded so the binary serves something sane from anywhere.
pub const DEFAULT_CONFIG_PATH: &str = "config/portcullis.toml";
const EMBEDDED: &[(&str, &str)] = &[
    (
        "config/portcullis.toml",
        include_str!("../../config/portcullis.toml"),
    ),
    ("config/vendors.toml", include_str!("../../config/vendors.toml")),
];

/// Includes nest at most this deep; deeper is almost certainly a cycle.
const MAX_INCLUDE_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{col}: {msg}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

/// Runtime settings that are not policy: where to listen, timeouts, sinks.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy: ProxySettings,
    pub admin_listen: Option<SocketAddr>,
    pub audit: AuditSettings,
    pub upstream: UpstreamSettings,
    pub auth: Option<AuthSettings>,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub client_hello_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub tunnel_require_tls: bool,
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `None` = stdout.
    pub path: Option<PathBuf>,
    pub queue: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// (host, port) → address, like `curl --resolve`.
    pub resolve: FxHashMap<(Host, u16), SocketAddr>,
    pub allow_private: Vec<IpNet>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub htpasswd: PathBuf,
    pub realm: String,
    pub required: bool,
}

/// A whole configuration, validated.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub policy: Policy,
    /// Every file read, for reload watching.
    pub files: Vec<PathBuf>,
}

/// One file's text, kept so spans can become line and column.
struct Source {
    path: PathBuf,
    text: String,
}

pub(crate) struct Sources {
    files: Vec<Source>,
    embedded: bool,
}

/// Where in which file a value was written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At {
    file: usize,
    start: usize,
}

impl Sources {
    pub(crate) fn error(&self, at: At, msg: impl std::fmt::Display) -> ConfigError {
        let src = &self.files[at.file];
        let upto = &src.text[..at.start.min(src.text.len())];
        let line = upto.matches('\n').count() + 1;
        let col = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError {
            file: src.path.display().to_string(),
            line,
            col,
            msg: msg.to_string(),
        }
    }

    pub(crate) fn at<T>(&self, file: usize, s: &S<T>) -> At {
        At {
            file,
            start: s.span().start,
        }
    }

    /// A path written in `file`, relative to that file's directory.
    pub(crate) fn relative(&self, file: usize, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        match self.files[file].path.parent() {
            Some(dir) => dir.join(p),
            None => p.to_path_buf(),
        }
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        if self.embedded {
            let key = path.to_string_lossy();
            if let Some((_, text)) = EMBEDDED.iter().find(|(p, _)| *p == key) {
                return Ok((*text).to_string());
            }
        }
        std::fs::read_to_string(path)
    }
}

/// The parsed files: the main one first, then includes, in the order rules take effect.
pub(crate) struct Parsed {
    pub main: ConfigFile,
    /// (file index, parsed include) in depth-first order, each before the file including it.
    pub includes: Vec<(usize, ConfigFile)>,
}

/// Loads and validates the configuration at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_with(path, false)
}

/// Loads `config/portcullis.toml` from the working directory, or the embedded copy when the
/// file is not there (a binary run from elsewhere still serves the shipped default).
pub fn load_default() -> Result<Loaded, ConfigError> {
    let path = Path::new(DEFAULT_CONFIG_PATH);
    load_with(path, !path.exists())
}

fn load_with(path: &Path, embedded: bool) -> Result<Loaded, ConfigError> {
    let mut sources = Sources {
        files: Vec::new(),
        embedded,
    };
    let mut includes = Vec::new();
    let main = parse_file(&mut sources, path, None, 0, &mut includes)?;
    let parsed = Parsed { main, includes };
    let (settings, policy) = compile::compile(&sources, parsed)?;
    let files = if embedded {
        Vec::new()
    } else {
        sources.files.iter().map(|s| s.path.clone()).collect()
    };
    Ok(Loaded {
        settings,
        policy,
        files,
    })
}

fn parse_file(
    sources: &mut Sources,
    path: &Path,
    from: Option<At>,
    depth: usize,
    includes: &mut Vec<(usize, ConfigFile)>,
) -> Result<ConfigFile, ConfigError> {
    let text = match sources.read(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(match from {
                Some(at) => sources.error(at, format!("cannot read {}: {e}", path.display())),
                None => ConfigError {
                    file: path.display().to_string(),
                    line: 1,
                    col: 1,
                    msg: format!("cannot read: {e}"),
                },
            })
        }
    };
    sources.files.push(Source {
        path: path.to_path_buf(),
        text,
    });
    let file = sources.files.len() - 1;
    let parsed: ConfigFile = match toml::from_str(&sources.files[file].text) {
        Ok(c) => c,
        Err(e) => {
            let at = At {
                file,
                start: e.span().map_or(0, |s| s.start),
            };
            return Err(sources.error(at, e.message().trim_end()));
        }
    };
    for inc in &parsed.include {
        let at = sources.at(file, inc);
        if depth + 1 > MAX_INCLUDE_DEPTH {
            return Err(sources.error(at, "includes nested too deep (a cycle?)"));
        }
        let target = sources.relative(file, inc.get_ref());
        if sources.files.iter().any(|s| s.path == target) {
            return Err(sources.error(at, format!("{} is included twice", target.display())));
        }
        let child = parse_file(sources, &target, Some(at), depth + 1, includes)?;
        let child_file = sources.files.iter().position(|s| s.path == target).unwrap_or(0);
        includes.push((child_file, child));
    }
    Ok(parsed)
}

/// "10s", "1m", "24h", "30d", "250ms".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
