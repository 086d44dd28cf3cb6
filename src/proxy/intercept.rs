//! An intercepted tunnel: TLS with a leaf from the org CA, then HTTP/1.1 or HTTP/2 inside
//! (whichever ALPN settles on), each request through the same handler as plain HTTP with
//! scheme https. Upstream, every request goes through the pooled client, which verifies the
//! real server's certificate.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use super::activity::Activity;
use super::on_wake::OnWake;
use super::records::Arrived;
use super::shutdown::Phase;
use super::{handler, Peer, State};
use crate::identity::ProxyUser;
use crate::policy::Host;
use crate::tls::ca::Authority;

/// The org CA and the TLS config that presents its leaves, built once at start.
pub struct Interceptor {
    pub authority: Arc<Authority>,
    /// Shared so TLS sessions resume across tunnels; picks the leaf by SNI.
    pub tls: Arc<rustls::ServerConfig>,
}

impl Interceptor {
    pub fn new(authority: Arc<Authority>) -> Interceptor {
        let tls = Arc::new(authority.server_config(None));
        Interceptor { authority, tls }
    }
}

/// What every request inside one intercepted tunnel shares.
pub struct Inside {
    /// The CONNECT target: every inner request goes here, whatever its Host says.
    pub host: Host,
    pub port: u16,
    /// Authenticated on the CONNECT; inner requests carry no proxy credentials.
    pub user: Option<ProxyUser>,
    pub sni: Option<Box<str>>,
    pub requests: AtomicU64,
    /// The bytes of HTTP inside the TLS, from the client and to it: the tunnel's record.
    pub from_client: AtomicU64,
    pub to_client: AtomicU64,
    /// This tunnel's own upstream connections. Shared ones would let one client starve the
    /// others: an HTTP/2 client that stops reading its responses leaves their data in the
    /// upstream connection's window until no stream on it can receive anything.
    pub upstream: super::tunnel_upstream::TunnelUpstream,
}

/// Serves the client side of an intercepted tunnel until it closes, idles out or shutdown
/// forces it. `Err` names why the tunnel ended abnormally, for the tunnel's audit record.
pub async fn serve<S>(
    state: Arc<State>,
    peer: Peer,
    inside: Arc<Inside>,
    io: S,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(icp) = state.interceptor.load_full() else {
        return Err("intercept_unavailable: no CA configured".into());
    };
    let config = match &inside.sni {
        Some(_) => icp.tls.clone(),
        // No SNI (an address literal): the leaf is for the CONNECT target.
        None => {
            let name = inside.host.to_string();
            let leaf = icp
                .authority
                .leaf(&name)
                .map_err(|e| format!("leaf_failed: {e}"))?;
            Arc::new(icp.authority.server_config(Some(leaf)))
        }
    };
    let settings = &state.settings.proxy;
    let mut signal = state.shutdown_signal();
    let accept = TlsAcceptor::from(config).accept(io);
    let accepted = tokio::select! {
        a = tokio::time::timeout(settings.client_hello_timeout, accept) => a,
        _ = signal.past(Phase::Draining) => return Err("shutdown".into()),
    };
    let tls = match accepted {
        Ok(Ok(t)) => t,
        // Typically a client that does not trust the org CA (or pins): it aborts the handshake.
        Ok(Err(e)) => return Err(format!("client_tls: {e}")),
        Err(_) => return Err("client_tls: handshake timed out".into()),
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(Active {
        inner: tls,
        activity: activity.clone(),
        inside: inside.clone(),
    });

    let st = state.clone();
    let ins = inside.clone();
    let service = service_fn(move |req| {
        handler::inner(Arrived::new(st.clone(), peer, Some(ins.clone()), req))
    });
    let idle = settings.idle_timeout;

    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let mut phase = Phase::Serving;
            // The watchers are polled only when they woke the task, not on each of the
            // connection's wake-ups.
            let mut idled = OnWake::new(activity.idle(idle));
            let mut revoked = OnWake::new(revoked_at_reload(&state, &inside));
            loop {
                tokio::select! {
                    r = conn.as_mut() => break r.map_err(|e| format!("inner_http: {e}")),
                    why = &mut revoked => break Err(format!("policy_reloaded: {why}")),
                    p = OnWake::new(signal.past(phase)) => {
                        phase = p;
                        if phase == Phase::Stopping {
                            break Err("shutdown".to_string());
                        }
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = &mut idled => break Err("idle_timeout".to_string()),
                }
            }
        }};
    }

    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(settings.max_header_bytes as u32)
            .max_concurrent_streams(256);
        drive!(b.serve_connection(io, service))
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes.max(8192))
            .keep_alive(true);
        // A WebSocket handshake takes the connection over (see `upgrade`).
        drive!(b.serve_connection(io, service).with_upgrades())
    }
}

/// Resolves, after a reload, once what admitted the tunnel itself is gone: its port left
/// `connect_ports`, or its proxy user the user file. The requests inside are decided one by
/// one on the current policy, but those two were checked only on the CONNECT; an HTTP/2
/// tunnel, whose streams outlive any one answer, must not carry on without them.
async fn revoked_at_reload(state: &State, inside: &Inside) -> &'static str {
    let mut swaps = state.policy_swapped.subscribe();
    loop {
        if swaps.changed().await.is_err() {
            return std::future::pending().await;
        }
        if !state.policy.load().connect_ports.contains(&inside.port) {
            return "port_not_allowed";
        }
        if let Some(u) = inside.user.as_ref() {
            if !super::handler::still_authorised(state, u) {
                return "proxy_user_revoked";
            }
        }
    }
}

/// The client stream of an intercepted tunnel, noting when bytes last moved (idle timeout)
/// and how many moved (the tunnel's record).
struct Active<S> {
    inner: S,
    activity: Arc<Activity>,
    inside: Arc<Inside>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.activity.touch();
            this.inside
                .from_client
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S> Active<S> {
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = *r {
            if n > 0 {
                self.activity.touch();
                self.inside.to_client.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
