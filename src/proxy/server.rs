//! Accepting client connections and serving HTTP/1.1 on them, with the connection limits:
//! max connections, max connections per client address, header read timeout (slowloris; it
//! also bounds keep-alive idleness; [`HeadTimer`]), send timeout (a client that stops reading),
//! max header size (431).

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::client_socket::{ClientSocket, Slots};
use super::head_wait::{HeadTimer, HeadWait};
use super::per_client::ClientCap;
use super::records::Arrived;
use super::shutdown::Phase;
use super::stall::SendTimeout;
use super::{handler, records, Peer, State};
use crate::metrics::Active;

/// Pending connections the kernel holds for `accept` (capped by `net.core.somaxconn`). The
/// common default of 128 overflows in a burst of new clients: the kernel then drops SYNs
/// (a second's delay for a real client) or the handshake's last ACK (a client that thinks it
/// is connected and is not).
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind`).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves until `stop` resolves, then drains: in-flight requests get `shutdown_grace`, after
/// which connections and tunnels are closed. Returns when every task has finished and written
/// its audit record.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    stop: impl std::future::Future<Output = ()>,
) {
    let settings = state.settings.proxy.clone();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let per_client = ClientCap::new(settings.max_connections_per_client);
    let mut builder = http1::Builder::new();
    builder
        // Kept by each connection's `HeadTimer` instead: hyper's is a timer per request.
        .header_read_timeout(None)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .keep_alive(true)
        .writev(true);

    tokio::pin!(stop);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let peer = Peer::new(addr);
        let addr = peer.addr;
        let Ok(client_slot) = per_client.acquire(addr.ip()) else {
            state.metrics.connections_refused_per_client.inc();
            tracing::debug!(client = %addr, "connection refused: max_connections_per_client");
            drop(stream);
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            state.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Held by the socket: a tunnel, or a lingering close, keeps its places.
        let slots = Slots {
            permit,
            client: client_slot,
        };
        let (socket, notes) = ClientSocket::new(stream, slots);
        let st = state.clone();
        let wait = HeadWait::new();
        let head_timeout = settings.header_read_timeout;
        let head_timer = HeadTimer::new(wait.clone(), head_timeout, notes.clone());
        let service = service_fn(move |req| {
            handler::handle(Arrived::new(st.clone(), peer, None, req), wait.busy())
        });
        let audit = state.clone();
        let conn = builder
            .serve_connection(
                TokioIo::new(SendTimeout::new(socket, settings.send_timeout)),
                service,
            )
            .with_upgrades();
        let token = state.shutdown.token();
        let mut signal = state.shutdown_signal();
        let active = Active::count(&state.metrics.connections_active);
        tokio::spawn(async move {
            let _token = token;
            let _active = active;
            tokio::pin!(conn);
            tokio::pin!(head_timer);
            let mut phase = Phase::Serving;
            loop {
                // Biased: the connection is what woke this task nearly every time, and an
                // unbiased select draws a random number on every wake to pick an order.
                tokio::select! {
                    biased;
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            // hyper answered a head it could not parse itself (400, 414, 431); the
                            // attempt still belongs in the audit log.
                            if e.is_parse() || e.is_parse_too_large() {
                                records::malformed(&audit, peer, &e);
                            }
                            // Our answer's body failed (the origin cut it, a byte limit):
                            // a reset tells even a client whose answer ends with the
                            // connection (HTTP/1.0, no length) that it did not get all of it.
                            if e.is_user() {
                                notes.reset_on_close();
                            }
                            tracing::debug!(client = %addr, error = %e, "connection ended with error");
                        }
                        break;
                    }
                    p = signal.past(phase) => {
                        phase = p;
                        if phase == Phase::Stopping {
                            // What is still in flight is cut: a reset says so to a client
                            // whose answer would otherwise end at the close.
                            notes.reset_on_close();
                            break;
                        }
                        // Finish the request in flight, then close instead of keeping alive.
                        conn.as_mut().graceful_shutdown();
                    }
                    () = &mut head_timer => {
                        // As hyper's own timeout: closed without an answer. A head begun and
                        // not finished (slowloris, or an attempt cut short) is on record.
                        tracing::debug!(client = %addr, "no request head within header_read_timeout");
                        if head_timer.heard_part_of_a_head() {
                            records::head_timed_out(&audit, peer, head_timeout);
                        }
                        break;
                    }
                }
            }
        });
    }
    drop(listener);

    let grace = settings.shutdown_grace;
    tracing::info!(grace = ?grace, live = state.shutdown.live(), "draining connections");
    state.shutdown.start_drain();
    let drained = tokio::time::timeout(grace, state.shutdown.idle()).await;
    if drained.is_err() {
        tracing::warn!(
            live = state.shutdown.live(),
            "grace period over; closing what is left"
        );
    }
    state.shutdown.stop_now();
    state.shutdown.idle().await;
}
