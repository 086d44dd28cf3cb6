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
    (
        "config/vendors.toml",
        include_str!("../../config/vendors.toml"),
    ),
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
    pub admin: AdminSettings,
    pub audit: AuditSettings,
    pub upstream: UpstreamSettings,
    pub auth: Option<AuthSettings>,
    /// `RUST_LOG` wins over this.
    pub log_level: String,
    /// Bulk-extraction detection; `None` = off.
    pub bulk: Option<crate::signals::bulk::BulkConfig>,
    pub limit_store: LimitStoreSettings,
    /// The interception CA; `None` = no tunnel is ever opened.
    pub intercept: Option<crate::tls::ca::AuthoritySettings>,
    /// HMAC secret for API-key fingerprints; `None` = a random one per process.
    pub key_secret_file: Option<PathBuf>,
}

/// Where limit state lives.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitStoreSettings {
    /// This process only.
    Memory { max_keys: usize },
    /// Shared by every replica pointing at the same Redis.
    Redis {
        url: String,
        on_store_error: crate::limits::OnStoreError,
        timeout: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacMode {
    /// Send only the catalog's vendor hosts to the proxy; everything else goes direct.
    Catalog,
    /// Send everything to the proxy.
    All,
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    pub pac: PacMode,
    /// host:port clients should use; default: the proxy's listen address.
    pub pac_proxy: Option<String>,
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
    /// Connections one client address may hold open at once; 0 = no cap.
    pub max_connections_per_client: usize,
    /// Longest gap between two chunks of a request or response body.
    pub body_timeout: Duration,
    /// Longest a write to a client may wait for the client to read.
    pub send_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `None` = stdout.
    pub path: Option<PathBuf>,
    pub queue: usize,
    /// Rotate the file when it grows past this many bytes (0 = never; use SIGUSR1 + logrotate).
    pub max_size: u64,
    /// Rotated files kept (`path.1` … `path.N`).
    pub keep: usize,
    /// What to do when records cannot be written as fast as they come.
    pub on_full: OnFull,
}

/// `[audit] on_full`: a full queue (or a failing sink) either refuses new requests until the
/// writer catches up (fail closed) or drops records and counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Serve on; count what cannot be queued in `portcullis_audit_dropped_total`.
    #[default]
    Drop,
    /// Answer 503 `audit_unavailable` to new requests and CONNECTs until the sink recovers.
    Block,
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
    /// The main file, `None` when the embedded default was used.
    pub source: Option<PathBuf>,
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

    /// Where the string `item` is written inside the value `outer` (an element of a list), so an
    /// error points at the element rather than at the list's bracket.
    pub(crate) fn at_item<T>(&self, file: usize, outer: &S<T>, item: &str) -> At {
        let span = outer.span();
        let text = &self.files[file].text;
        let inside = text.get(span.clone()).unwrap_or("");
        let found = [format!("\"{item}\""), format!("'{item}'")]
            .iter()
            .filter_map(|q| inside.find(q.as_str()))
            .min();
        At {
            file,
            start: span.start + found.unwrap_or(0),
        }
    }

    /// The first place `needle` is written in `file` (start of file when absent).
    pub(crate) fn find(&self, file: usize, needle: &str) -> At {
        At {
            file,
            start: self.files[file].text.find(needle).unwrap_or(0),
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
        source: (!embedded).then(|| path.to_path_buf()),
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
        let child_file = sources
            .files
            .iter()
            .position(|s| s.path == target)
            .unwrap_or(0);
        includes.push((child_file, child));
    }
    Ok(parsed)
}

/// "500MiB", "1GB", "64KiB", "1024" (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (like \"500MiB\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(v as u64)
}

/// "10s", "1m", "24h", "30d", "250ms".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
