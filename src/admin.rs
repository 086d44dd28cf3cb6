//! The admin listener: `/metrics`, `/healthz` (the process is up), `/readyz` (policy loaded and
//! listeners bound), `POST /reload`, `/policy` (the compiled policy, no secrets) and
//! `/proxy.pac`. Loopback by default; with `token_file` set, `/reload` and `/policy` need
//! `Authorization: Bearer <token>`.
//!
//! Liveness probes land here, so no client may crowd them out: a connection must send its
//! request head within 2 s (and the next one within 2 s of a response), one source address may
//! hold 8 connections, and all of them together 64.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::proxy::per_client::ClientCap;
use crate::proxy::stall::SendTimeout;
use crate::proxy::State;

/// Scrapers and operators need few connections: beyond this many at once the oldest is
/// closed, so clients holding admin connections open cannot take the proxy's file
/// descriptors, nor every slot.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Connections one source address may hold at once; further ones are closed at accept. One
/// client (a runaway script, a scan) cannot take every slot, so the kubelet's probes and the
/// scraper, from their own addresses, still get in.
const MAX_ADMIN_CONNECTIONS_PER_SOURCE: usize = 8;

/// A request head must arrive within this of the connection opening or of the previous
/// response (the keep-alive idle limit too). Admin requests are a few hundred bytes sent at
/// once; the proxy's `header_read_timeout` (20 s) would let idle connections hold slots for
/// long enough to starve the probes.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// A client that stops reading a response for this long is disconnected.
const ADMIN_SEND_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    // Oldest first. When every slot is taken the oldest connection is closed for the new
    // one: connections from many addresses (each under its cap) that hold their slots
    // idle cannot keep the probe out, since it is always the newest and done in
    // milliseconds, while a flood would have to reopen all of its slots that fast.
    // A connection answering a request is passed over: the churn must not cut a probe
    // whose head has arrived.
    let mut live: VecDeque<(AbortHandle, Arc<AtomicBool>)> =
        VecDeque::with_capacity(MAX_ADMIN_CONNECTIONS);
    let per_source = ClientCap::new(MAX_ADMIN_CONNECTIONS_PER_SOURCE);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT);
    // The series /metrics shows exist from the first scrape on, and a reload's new vendors
    // and limit rules get theirs as soon as the policy is swapped (see `metrics`).
    let bulk = state.bulk.is_some();
    let mut swaps = state.policy_swapped.subscribe();
    state.metrics.seed_policy(&state.policy.load(), bulk);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Ok(()) = swaps.changed() => {
                state.metrics.seed_policy(&state.policy.load(), bulk);
                continue;
            }
        };
        let source = addr.ip().to_canonical();
        let Ok(source_slot) = per_source.acquire(source) else {
            tracing::debug!(client = %addr, "admin connection refused: per-source cap");
            drop(stream);
            continue;
        };
        live.retain(|(c, _)| !c.is_finished());
        if live.len() >= MAX_ADMIN_CONNECTIONS {
            let idle = live
                .iter()
                .position(|(_, busy)| !busy.load(Ordering::Relaxed))
                .unwrap_or(0);
            if let Some((oldest, _)) = live.remove(idle) {
                tracing::debug!(client = %addr, "admin connection cap: closing the oldest idle");
                oldest.abort();
            }
        }
        let busy = Arc::new(AtomicBool::new(false));
        let answering = busy.clone();
        let st = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(SendTimeout::new(stream, ADMIN_SEND_TIMEOUT)),
            service_fn(move |req| {
                let st = st.clone();
                let answering = answering.clone();
                async move {
                    answering.store(true, Ordering::Relaxed);
                    let resp = route(&st, req).await;
                    answering.store(false, Ordering::Relaxed);
                    Ok::<_, Infallible>(resp)
                }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = conn.await;
            drop(source_slot);
        });
        live.push_back((task.abort_handle(), busy));
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
        (&Method::GET | &Method::HEAD, "/proxy.pac") => pac_file(state, &req),
        (_, "/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        (_, "/metrics" | "/healthz" | "/readyz" | "/policy" | "/proxy.pac" | "/top") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The proxy auto-config file, served here and (origin-form `GET /proxy.pac` or `/wpad.dat`) on
/// the proxy listener, which every client that may use the proxy can already reach.
pub fn pac_file<B>(state: &State, req: &Request<B>) -> Response<Full<Bytes>> {
    let proxy = pac_proxy(state, req);
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

/// The proxy address to hand clients: configured, else the listen address, with an
/// unspecified IP replaced by the host the PAC file was fetched from.
fn pac_proxy<B>(state: &State, req: &Request<B>) -> String {
    if let Some(p) = &state.settings.admin.pac_proxy {
        return p.clone();
    }
    let listen = state.listen_addr;
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    // The Host header is the client's to write: only a plain name, IPv4 address or
    // bracketed IPv6 address is taken from it.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| match h.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map_or("", |(a, _)| a),
            None => h.split(':').next().unwrap_or(""),
        })
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        });
    match host {
        Some(h) if h.contains(':') => format!("[{h}]:{}", listen.port()),
        Some(h) => format!("{h}:{}", listen.port()),
        None => format!("127.0.0.1:{}", listen.port()),
    }
}
