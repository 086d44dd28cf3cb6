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
use crate::proxy::State;

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

/// Loads the configuration again and swaps the policy in.
pub async fn reload(state: &State) -> Result<Outcome, ConfigError> {
    let _one = RELOADING.lock().await;
    let source = state.source.clone();
    // File reads and compilation are blocking work: keep them off the request threads.
    let loaded = tokio::task::spawn_blocking(move || match source {
        Some(p) => config::load(&p),
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
    match loaded {
        Ok((l, users)) => {
            let needs_restart = changed_settings(&state.settings, &l.settings);
            if let (Some(auth), Some(users)) = (&state.auth, users) {
                auth.htpasswd.store(Arc::new(users));
            }
            let outcome = Outcome {
                rules: l.policy.rules.len(),
                vendors: l.policy.catalog.vendors().len(),
                needs_restart,
            };
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
/// replace files by rename) and reloads after changes settle.
pub fn watch(state: Arc<State>, files: Vec<PathBuf>) -> Option<notify::RecommendedWatcher> {
    if files.is_empty() {
        return None;
    }
    let wanted: HashSet<PathBuf> = files.iter().map(|f| canonical(f)).collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev.kind.is_access() {
                return;
            }
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
    // Both the directory as written and the one symlinks lead to: an edited file changes in
    // the latter, a swapped symlink (ConfigMap mounts) in the former.
    let dirs: HashSet<PathBuf> = files
        .iter()
        .flat_map(|f| [canonical(f), absolute(f)])
        .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
        .collect();
    for d in dirs {
        if let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch config directory");
        }
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
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
    });
    Some(watcher)
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
