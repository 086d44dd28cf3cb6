//! The admin listener: `/metrics`, `/healthz` (the process is up), `/readyz` (policy loaded and
//! listeners bound), `POST /reload`, `/policy` (the compiled policy, no secrets) and
//! `/proxy.pac`. Loopback by default; with `token_file` set, `/reload` and `/policy` need
//! `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::State;

/// Scrapers and operators need few connections: more than this at once are closed at accept,
/// so a client holding admin connections open cannot take the proxy's file descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    // The proxy's own slowloris guard applies here too.
    let head_timeout = state.settings.proxy.header_read_timeout;
    // The series /metrics shows exist from the first scrape on, and a reload's new vendors
    // and limit rules get theirs as soon as the policy is swapped (see `metrics`).
    let bulk = state.bulk.is_some();
    let mut swaps = state.policy_swapped.subscribe();
    state.metrics.seed_policy(&state.policy.load(), bulk);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            Ok(()) = swaps.changed() => {
                state.metrics.seed_policy(&state.policy.load(), bulk);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(route(&st, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(slot);
        });
    }
}

fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.admin_token else {
        return true;
    };
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time compare: the token guards policy changes.
    got.len() == token.len()
        && got
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    let protected = matches!(path, "/reload" | "/policy" | "/top");
    if protected && !authorized(state, &req) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "bearer token required\n",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    match (method, path) {
        (&Method::POST, "/reload") => match crate::reload::reload(state).await {
            Ok(o) => text(
                StatusCode::OK,
                "application/json",
                serde_json::json!({
                    "result": "ok",
                    "rules": o.rules,
                    "vendors": o.vendors,
                    "needs_restart": o.needs_restart,
                })
                .to_string(),
            ),
            Err(e) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                "application/json",
                serde_json::json!({"result": "error", "error": e.to_string()}).to_string(),
            ),
        },
        (&Method::GET | &Method::HEAD, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(),
        ),
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.ready.load(Ordering::Acquire)
                && state.shutdown.phase() == crate::proxy::shutdown::Phase::Serving
            {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (&Method::GET | &Method::HEAD, "/policy") => {
            let policy = state.policy.load();
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&crate::policy::describe::describe(&policy))
                    .unwrap_or_default(),
            )
        }
        (&Method::GET | &Method::HEAD, "/top") => {
            let vendor = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("vendor=")));
            let body = match &state.bulk {
                Some(b) => serde_json::to_vec_pretty(&serde_json::json!({
                    "window_secs": state.settings.bulk.as_ref().map_or(0, |c| c.window.as_secs()),
                    "vendors": b.top(vendor, std::time::Instant::now()),
                })),
                None => serde_json::to_vec(&serde_json::json!({"error": "bulk detection is off"})),
            };
            text(StatusCode::OK, "application/json", body.unwrap_or_default())
        }
        (&Method::GET | &Method::HEAD, "/proxy.pac") => {
            let proxy = pac_proxy(state, &req);
            let policy = state.policy.load();
            text(
                StatusCode::OK,
                "application/x-ns-proxy-autoconfig",
                crate::policy::describe::pac(
                    &policy,
                    &proxy,
                    state.settings.admin.pac == crate::config::PacMode::All,
                ),
            )
        }
        (_, "/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        (_, "/metrics" | "/healthz" | "/readyz" | "/policy" | "/proxy.pac" | "/top") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The proxy address to hand clients: configured, else the listen address, with an
/// unspecified IP replaced by the host the PAC file was fetched from.
fn pac_proxy(state: &State, req: &Request<Incoming>) -> String {
    if let Some(p) = &state.settings.admin.pac_proxy {
        return p.clone();
    }
    let listen = state.listen_addr;
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.rsplit_once(':').map_or(Some(h), |(h, _)| Some(h)))
        .unwrap_or("127.0.0.1");
    format!("{host}:{}", listen.port())
}
