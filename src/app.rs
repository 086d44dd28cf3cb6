//! Wiring: from a loaded configuration to running listeners, and back down again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::audit;
use crate::config::{LimitStoreSettings, Loaded};
use crate::identity::htpasswd::Htpasswd;
use crate::identity::keys::KeyFingerprinter;
use crate::limits::{Limiter, MemoryConfig, RedisConfig};
use crate::metrics::Metrics;
use crate::proxy::{self, Auth, State};
use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("audit log: {0}")]
    Audit(std::io::Error),
    #[error("upstream TLS: {0}")]
    UpstreamTls(String),
    #[error("{0}")]
    Htpasswd(String),
    #[error("{0}")]
    Secret(String),
    #[error("limit store: {0}")]
    Limits(String),
    #[error("interception CA: {0}")]
    Ca(#[from] crate::tls::ca::CaError),
}

/// A running proxy.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    done: JoinHandle<()>,
    /// Kept alive for as long as the proxy runs.
    _watcher: Option<Arc<crate::reload::WatchHandle>>,
}

impl Running {
    /// Stops accepting, drains (up to the grace period), flushes the audit log.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.done).await;
    }

    /// Resolves when the proxy has stopped (after `shutdown` was asked elsewhere).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Reads every file the settings name, as `start` will (user file, admin token, key
/// secret, upstream CA file, interception CA), without binding or starting anything:
/// `portcullis check` runs this so a config it passes also starts. Errors name the key.
pub fn check_files(settings: &crate::config::Settings) -> Result<(), StartError> {
    let named = |key: &str, e: String| StartError::Secret(format!("{key}: {e}"));
    if let Some(a) = &settings.auth {
        crate::secrets::refuse_world_readable(&a.htpasswd)
            .map_err(|e| named("[auth] htpasswd", e))?;
        Htpasswd::load(&a.htpasswd).map_err(|e| named("[auth] htpasswd", e.to_string()))?;
    }
    if let Some(p) = &settings.admin.token_file {
        crate::secrets::read_secret_file(p).map_err(|e| named("[admin] token_file", e))?;
    }
    KeyFingerprinter::configured(settings.key_secret_file.as_deref())
        .map_err(|e| named("[keys] secret_file", e))?;
    Upstream::new(&settings.upstream, Vec::new())
        .map_err(|e| StartError::UpstreamTls(format!("[upstream]: {e}")))?;
    if let Some(a) = &settings.intercept {
        crate::tls::ca::Authority::load(a)?;
    }
    Ok(())
}

/// Binds the listeners and starts serving.
pub async fn start(loaded: Loaded) -> Result<Running, StartError> {
    let settings = loaded.settings;
    let settings_bulk = settings.bulk.clone();
    if let Some(a) = &settings.auth {
        crate::secrets::refuse_world_readable(&a.htpasswd).map_err(StartError::Secret)?;
    }
    let bind = |addr: SocketAddr| async move {
        proxy::server::bind(addr).map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(settings.proxy.listen).await?;
    let proxy_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: settings.proxy.listen,
        source,
    })?;
    let admin = match settings.admin.listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());

    let metrics = Arc::new(Metrics::new());
    let (sink, writer) = audit::start(
        &settings.audit,
        metrics.audit_records.clone(),
        metrics.audit_dropped.clone(),
    )
    .map_err(StartError::Audit)?;

    let own: Vec<SocketAddr> = std::iter::once(proxy_addr).chain(admin_addr).collect();
    let upstream =
        Arc::new(Upstream::new(&settings.upstream, own).map_err(StartError::UpstreamTls)?);
    let client = crate::proxy::https_client(upstream.clone(), &settings.upstream, usize::MAX);
    let inner_streams =
        crate::proxy::per_client::ClientCap::new(settings.proxy.max_connections_per_client);
    let direct = crate::upstream::direct::DirectPool::new(
        upstream.clone(),
        settings.upstream.pool_idle_timeout,
        settings.upstream.pool_max_idle_per_host,
    );
    let h1 = crate::upstream::pool::Pool::new(
        upstream.clone(),
        settings.upstream.pool_idle_timeout,
        settings.upstream.pool_max_idle_per_host,
    );

    let admin_token = match &settings.admin.token_file {
        Some(p) => Some(crate::secrets::read_secret_file(p).map_err(StartError::Secret)?),
        None => None,
    };
    let keys = KeyFingerprinter::configured(settings.key_secret_file.as_deref())
        .map_err(StartError::Secret)?;
    let auth = match &settings.auth {
        Some(a) => Some(Auth {
            htpasswd: arc_swap::ArcSwap::from_pointee(
                Htpasswd::load(&a.htpasswd).map_err(|e| StartError::Htpasswd(e.to_string()))?,
            ),
            realm: a.realm.clone(),
            required: a.required,
        }),
        None => None,
    };

    let limiter = Arc::new(match &settings.limit_store {
        LimitStoreSettings::Memory { max_keys } => Limiter::memory(MemoryConfig {
            max_keys: *max_keys,
            ..MemoryConfig::default()
        }),
        LimitStoreSettings::Redis {
            url,
            on_store_error,
            timeout,
        } => Limiter::redis(
            url,
            RedisConfig {
                on_store_error: *on_store_error,
                timeout: *timeout,
                errors_metric: Some(metrics.limit_store_errors.clone()),
                ..RedisConfig::default()
            },
        )
        .await
        .map_err(|e| StartError::Limits(e.to_string()))?,
    });

    let interceptor = match &settings.intercept {
        Some(a) => Some(Arc::new(proxy::intercept::Interceptor::new(Arc::new(
            crate::tls::ca::Authority::load(a)?,
        )))),
        None => None,
    };

    let state = Arc::new(State {
        policy: ArcSwap::from_pointee(loaded.policy),
        policy_swapped: tokio::sync::watch::Sender::new(0),
        settings,
        upstream,
        client,
        inner_streams,
        h1,
        direct,
        audit: sink,
        metrics,
        auth,
        keys,
        interceptor: arc_swap::ArcSwapOption::new(interceptor),
        ready: AtomicBool::new(false),
        shutdown: proxy::shutdown::Shutdown::default(),
        source: loaded.source,
        admin_token,
        listen_addr: proxy_addr,
        bulk: settings_bulk.map(crate::signals::bulk::BulkDetector::new),
        limiter,
    });
    // The user file is watched with the config: saving it reloads, and so revokes.
    let watcher = crate::reload::watch(state.clone(), loaded.files);

    // Ready before the admin listener answers: both listeners are bound, so a probe that
    // connects from here on reaches a proxy that will serve it (the accept loop starts next).
    state.ready.store(true, Ordering::Release);
    let admin_task = admin.map(|l| tokio::spawn(crate::admin::serve(l, state.clone())));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let st = state.clone();
    let done = tokio::spawn(async move {
        proxy::server::serve(listener, st.clone(), async {
            let _ = stop_rx.await;
        })
        .await;
        if let Some(t) = admin_task {
            t.abort();
        }
        let sink = st.audit.clone();
        let _ = tokio::task::spawn_blocking(move || writer.close(&sink)).await;
    });
    tracing::info!(proxy = %proxy_addr, admin = ?admin_addr, "portcullis serving");
    for note in state.policy.load().blind_rules() {
        tracing::warn!("{note}");
    }
    Ok(Running {
        proxy_addr,
        admin_addr,
        state,
        stop: Some(stop_tx),
        done,
        _watcher: watcher,
    })
}
