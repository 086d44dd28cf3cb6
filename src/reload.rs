//! Policy reload: compile the files aside, swap the policy atomically. Requests in flight keep
//! the `Arc<Policy>` they started with. A failed reload keeps the old policy and says
//! `FILE:LINE:COL: message`. Triggers: SIGHUP, `POST /reload`, and a change to any file read.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, Mutex};

use crate::config::{self, ConfigError, Settings};
use crate::proxy::intercept::Interceptor;
use crate::proxy::State;
use crate::tls::ca::Authority;

/// What a reload did.
#[derive(Debug)]
pub struct Outcome {
    pub rules: usize,
    pub vendors: usize,
    /// Settings that differ from the running ones and need a restart to apply.
    pub needs_restart: Vec<&'static str>,
}

/// Serialises reloads: two at once would race on which policy wins.
static RELOADING: Mutex<()> = Mutex::const_new(());

/// The files each running policy was read from (by main config file; tests run several
/// proxies in one process), after its latest successful reload: the watcher follows an
/// `include` added (or removed) since start.
type FilesBySource = Vec<(Option<PathBuf>, Vec<PathBuf>)>;
static POLICY_FILES: std::sync::Mutex<FilesBySource> = std::sync::Mutex::new(Vec::new());

fn policy_files(source: &Option<PathBuf>) -> Vec<PathBuf> {
    let Ok(all) = POLICY_FILES.lock() else {
        return Vec::new();
    };
    all.iter()
        .find(|(s, _)| s == source)
        .map(|(_, f)| f.clone())
        .unwrap_or_default()
}

fn set_policy_files(source: &Option<PathBuf>, files: Vec<PathBuf>) {
    let Ok(mut all) = POLICY_FILES.lock() else {
        return;
    };
    match all.iter_mut().find(|(s, _)| s == source) {
        Some((_, f)) => *f = files,
        None => all.push((source.clone(), files)),
    }
}

/// Loads the configuration again and swaps the policy in.
pub async fn reload(state: &State) -> Result<Outcome, ConfigError> {
    let _one = RELOADING.lock().await;
    let source = state.source.clone();
    // File reads and compilation are blocking work: keep them off the request threads.
    let loaded = tokio::task::spawn_blocking(move || match source {
        Some(p) => {
            // An editor that truncates the file and then writes it wakes the watcher in
            // between: an empty file is valid TOML with no catalog and no rules (everything
            // allowed), never what an operator means. The old policy stays.
            let empty = std::fs::read(&p).is_ok_and(|b| b.trim_ascii().is_empty());
            if empty {
                return Err(ConfigError {
                    file: p.display().to_string(),
                    line: 1,
                    col: 1,
                    msg:
                        "the config file is empty (a save in progress?); keeping the current policy"
                            .into(),
                });
            }
            config::load(&p)
        }
        None => config::load_default(),
    })
    .await
    .unwrap_or_else(|e| {
        Err(ConfigError {
            file: "-".into(),
            line: 0,
            col: 0,
            msg: format!("reload task failed: {e}"),
        })
    });
    // The user file too, read before anything is swapped: a broken one fails the whole
    // reload, the old policy and users stay.
    let loaded = match loaded {
        Ok(l) => match reload_users(state, &l.settings).await {
            Ok(users) => Ok((l, users)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    // And the CA, when `[intercept]` is there: one that does not load fails the reload too.
    let loaded = match loaded {
        Ok((l, users)) => match next_interceptor(state, &l.settings).await {
            Ok(icp) => Ok((l, users, icp)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match loaded {
        Ok((l, users, interceptor)) => {
            let needs_restart = changed_settings(&state.settings, &l.settings);
            if let (Some(auth), Some(users)) = (&state.auth, users) {
                auth.htpasswd.store(Arc::new(users));
            }
            let outcome = Outcome {
                rules: l.policy.rules.len(),
                vendors: l.policy.catalog.vendors().len(),
                needs_restart,
            };
            set_policy_files(&state.source, l.files);
            // Before the policy that lists what to intercept: a tunnel opened between the two
            // stores meets the new CA and the old lists, never new lists and no CA.
            state.interceptor.store(interceptor);
            for note in l.policy.blind_rules() {
                tracing::warn!("{note}");
            }
            state.policy.store(Arc::new(l.policy));
            state.policy_swapped.send_modify(|n| *n += 1);
            state
                .metrics
                .config_reloads
                .with_label_values(&["ok"])
                .inc();
            if outcome.needs_restart.is_empty() {
                tracing::info!(
                    rules = outcome.rules,
                    vendors = outcome.vendors,
                    "policy reloaded"
                );
            } else {
                tracing::warn!(
                    rules = outcome.rules,
                    changed = ?outcome.needs_restart,
                    "policy reloaded; changed settings outside the policy need a restart and were not applied"
                );
            }
            Ok(outcome)
        }
        Err(e) => {
            state
                .metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            tracing::error!("reload failed, keeping the running policy: {e}");
            Err(e)
        }
    }
}

/// The interceptor the reloaded settings call for: the running one while its CA files and
/// settings are unchanged (its leaf cache and TLS sessions stay), a new one when `[intercept]`
/// was added or its CA changed, none when it was removed. CA files that no longer load under
/// unchanged settings (a key made readable to others, a file half-copied) keep the running
/// CA, with an error in the log, so that the rest of the reload, an urgent block rule say, is
/// not held up by them; a CA newly named that does not load fails the reload.
async fn next_interceptor(
    state: &State,
    settings: &Settings,
) -> Result<Option<Arc<Interceptor>>, ConfigError> {
    let Some(ca) = settings.intercept.clone() else {
        return Ok(None);
    };
    let config_file = state
        .source
        .as_ref()
        .map_or_else(|| "-".to_string(), |p| p.display().to_string());
    let wanted = ca.clone();
    let loaded = tokio::task::spawn_blocking(move || Authority::load(&ca))
        .await
        .map_err(|e| e.to_string())
        .and_then(|loaded| loaded.map_err(|e| e.to_string()));
    let running = state.interceptor.load_full();
    match (loaded, running) {
        (Ok(a), Some(running)) if running.authority.same_as(&a) => Ok(Some(running)),
        (Ok(a), _) => Ok(Some(Arc::new(Interceptor::new(Arc::new(a))))),
        (Err(msg), Some(running)) if *running.authority.settings() == wanted => {
            tracing::error!("[intercept]: {msg}; keeping the CA loaded before");
            Ok(Some(running))
        }
        (Err(msg), _) => Err(ConfigError {
            file: config_file,
            line: 0,
            col: 0,
            msg: format!("[intercept]: {msg}"),
        }),
    }
}

/// Sections that are wired into listeners, sockets and tasks at start.
fn changed_settings(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.proxy.listen != new.proxy.listen {
        out.push("proxy.listen");
    }
    if old.admin.listen != new.admin.listen {
        out.push("admin.listen");
    }
    if format!("{:?}", old.proxy) != format!("{:?}", new.proxy) && !out.contains(&"proxy.listen") {
        out.push("proxy");
    }
    if format!("{:?}", old.upstream) != format!("{:?}", new.upstream) {
        out.push("upstream");
    }
    if format!("{:?}", old.audit) != format!("{:?}", new.audit) {
        out.push("audit");
    }
    if format!("{:?}", old.auth) != format!("{:?}", new.auth) {
        out.push("auth");
    }
    if format!("{:?}", old.bulk) != format!("{:?}", new.bulk) {
        out.push("bulk");
    }
    if old.limit_store != new.limit_store {
        out.push("limit_store");
    }
    out
}

/// Watches every file the configuration was read from (their directories, since editors
/// replace files by rename) and reloads after changes settle. After every reload, whatever
/// triggered it, the watch follows the files the new policy was read from.
pub fn watch(state: Arc<State>, files: Vec<PathBuf>) -> Option<Arc<WatchHandle>> {
    if files.is_empty() {
        return None;
    }
    // Beside the policy's own files: the user file, which a reload reads again too.
    let extra: Vec<PathBuf> = state
        .settings
        .auth
        .iter()
        .map(|a| a.htpasswd.clone())
        .filter(|h| !files.contains(h))
        .collect();
    let wanted: Arc<std::sync::RwLock<HashSet<PathBuf>>> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let seen = wanted.clone();
    let watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev.kind.is_access() {
                return;
            }
            let Ok(wanted) = seen.read() else { return };
            // `..data` is the symlink Kubernetes swaps when a mounted ConfigMap changes.
            let hit = ev.paths.iter().any(|p| {
                wanted.contains(&canonical(p)) || p.file_name().is_some_and(|n| n == "..data")
            });
            if hit {
                let _ = tx.send(());
            }
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP or POST /reload");
            return None;
        }
    };
    let handle = Arc::new(WatchHandle {
        watcher: std::sync::Mutex::new(watcher),
        wanted,
        dirs: std::sync::Mutex::new(HashSet::new()),
    });
    handle.follow(files.iter().chain(&extra));
    let h = handle.clone();
    let mut swapped = state.policy_swapped.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    if ev.is_none() {
                        return;
                    }
                    // Debounce: editors write in several steps; reload once it has been quiet.
                    loop {
                        match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                            Ok(Some(())) => continue,
                            Ok(None) => return,
                            Err(_) => break,
                        }
                    }
                    let _ = reload(&state).await;
                }
                changed = swapped.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let files = policy_files(&state.source);
                    if !files.is_empty() {
                        h.follow(files.iter().chain(&extra));
                    }
                }
            }
        }
    });
    Some(handle)
}

/// The file watcher and what it watches, kept alive by the running proxy.
pub struct WatchHandle {
    watcher: std::sync::Mutex<notify::RecommendedWatcher>,
    /// Files whose changes trigger a reload (canonical paths).
    wanted: Arc<std::sync::RwLock<HashSet<PathBuf>>>,
    /// Directories watched so far (never unwatched: a stray event costs one reload).
    dirs: std::sync::Mutex<HashSet<PathBuf>>,
}

impl WatchHandle {
    /// Watches `files` from now on, instead of the previous set.
    fn follow<'a>(&self, files: impl Iterator<Item = &'a PathBuf> + Clone) {
        if let Ok(mut w) = self.wanted.write() {
            *w = files.clone().map(|f| canonical(f)).collect();
        }
        // Both the directory as written and the one symlinks lead to: an edited file changes
        // in the latter, a swapped symlink (ConfigMap mounts) in the former.
        let dirs: HashSet<PathBuf> = files
            .flat_map(|f| [canonical(f), absolute(f)])
            .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
            .collect();
        let (Ok(mut watcher), Ok(mut watched)) = (self.watcher.lock(), self.dirs.lock()) else {
            return;
        };
        for d in dirs {
            if watched.contains(&d) {
                continue;
            }
            match watcher.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(d);
                }
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch config directory")
                }
            }
        }
    }
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn canonical(p: &std::path::Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    // A file mid-replace may not exist: canonicalise its directory instead.
    match (
        p.parent().and_then(|d| d.canonicalize().ok()),
        p.file_name(),
    ) {
        (Some(d), Some(n)) => d.join(n),
        _ => p.to_path_buf(),
    }
}

/// The htpasswd file read again, when `[auth]` is unchanged (a changed `[auth]` needs a
/// restart, and is reported so): a removed user is refused from the next request on.
async fn reload_users(
    state: &State,
    new: &crate::config::Settings,
) -> Result<Option<crate::identity::htpasswd::Htpasswd>, ConfigError> {
    let (Some(_), Some(a)) = (&state.auth, &new.auth) else {
        return Ok(None);
    };
    if format!("{:?}", state.settings.auth) != format!("{:?}", new.auth) {
        return Ok(None);
    }
    let path = a.htpasswd.clone();
    let read = tokio::task::spawn_blocking(move || {
        crate::secrets::refuse_world_readable(&path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            col: 0,
            msg: e.to_string(),
        })?;
        crate::identity::htpasswd::Htpasswd::load(&path).map_err(|e| match e {
            crate::identity::htpasswd::HtpasswdError::Parse {
                path,
                line,
                col,
                msg,
            } => ConfigError {
                file: path,
                line,
                col,
                msg,
            },
            other => ConfigError {
                file: path.display().to_string(),
                line: 0,
                col: 0,
                msg: other.to_string(),
            },
        })
    })
    .await;
    match read {
        Ok(r) => r.map(Some),
        Err(e) => Err(ConfigError {
            file: "-".into(),
            line: 0,
            col: 0,
            msg: format!("reload task failed: {e}"),
        }),
    }
}
