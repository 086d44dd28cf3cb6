//! Reaching origins: resolution (with `[upstream] resolve` overrides), the address guard on
//! every resolved address, and connecting to exactly the address that was checked.

pub mod connector;
pub mod direct;
pub mod guard;
pub mod idle;
pub mod pool;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::net::TcpStream;

use crate::config::UpstreamSettings;
use crate::error::ProxyError;
use crate::policy::target::Host;
use guard::AddressGuard;

pub struct Upstream {
    overrides: FxHashMap<(Host, u16), SocketAddr>,
    guard: AddressGuard,
    connect_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
    /// The same trust, offering only `http/1.1`: a protocol upgrade (WebSocket) exists only
    /// in HTTP/1.1, and an origin that picked h2 could not be asked for one.
    pub tls_h1: Arc<rustls::ClientConfig>,
}

impl Upstream {
    /// `own` = the proxy's listener addresses, never dialled.
    pub fn new(s: &UpstreamSettings, own: Vec<SocketAddr>) -> Result<Upstream, String> {
        let tls = client_tls(s.ca_file.as_deref(), &[b"h2", b"http/1.1"])?;
        let mut tls_h1 = tls.clone();
        tls_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Upstream {
            overrides: s.resolve.clone(),
            guard: AddressGuard::new(s.allow_private.clone(), own),
            connect_timeout: s.connect_timeout,
            tls: Arc::new(tls),
            tls_h1: Arc::new(tls_h1),
        })
    }

    /// Resolves, guards and connects; returns the stream and the address dialled.
    pub async fn connect(
        &self,
        host: &Host,
        port: u16,
    ) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let addrs = self.resolve(host, port).await?;
        let mut denied = None;
        let mut last_err = None;
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        for addr in addrs {
            if let Err(d) = self.guard.check(addr) {
                denied.get_or_insert(d);
                continue;
            }
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    if let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) {
                        if let Err(d) = self.guard.check_connected(local, peer) {
                            denied.get_or_insert(d);
                            continue;
                        }
                    }
                    let _ = s.set_nodelay(true);
                    return Ok((s, addr));
                }
                Ok(Err(e)) => last_err = Some(ProxyError::Connect(e)),
                Err(_) => return Err(ProxyError::ConnectTimeout),
            }
        }
        Err(last_err
            .or(denied.map(ProxyError::AddressDenied))
            .unwrap_or(ProxyError::NoAddress))
    }

    /// The addresses `host` is dialled at: the `resolve` override, the literal, or DNS.
    pub async fn resolve(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, ProxyError> {
        if let Some(a) = self.overrides.get(&(host.clone(), port)) {
            return Ok(vec![*a]);
        }
        match host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
            // getaddrinfo runs on tokio's blocking pool, off the request threads.
            Host::Name(name) => match tokio::net::lookup_host((&**name, port)).await {
                Ok(it) => {
                    let v: Vec<SocketAddr> = it.collect();
                    if v.is_empty() {
                        Err(ProxyError::NoAddress)
                    } else {
                        Ok(v)
                    }
                }
                Err(e) => Err(ProxyError::Dns(e.to_string())),
            },
        }
    }
}

/// Whether an answer hyper's client read has a head over [`direct::MAX_HEAD_BYTES`]. hyper
/// holds only its read buffer to that ceiling, and one read can overshoot it by whatever the
/// socket had: counted here as on the wire, so the limit does not depend on how reads split.
pub fn head_too_large<B>(resp: &http::Response<B>) -> bool {
    // "HTTP/1.1 200 " and the line's CRLF, then each field's ": " and CRLF, and the blank line.
    let line = 15 + resp.status().canonical_reason().map_or(0, str::len);
    let fields: usize = resp
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    line + fields + 2 > direct::MAX_HEAD_BYTES
}

/// What a `hyper::Error` from an upstream exchange means for the client and the audit log.
pub fn hyper_error(e: &hyper::Error) -> ProxyError {
    if let Some(p) = crate::proxy::stall::classify_hyper(e) {
        return p;
    }
    let mut msg = e.to_string();
    if let Some(s) = std::error::Error::source(e) {
        msg = format!("{msg}: {s}");
    }
    ProxyError::Upstream(msg)
}

/// rustls client config: the system's trust store (the Mozilla bundle compiled in when the
/// system has none, as in a distroless container) plus `ca_file`. Read once, at start.
pub fn client_tls(ca_file: Option<&Path>, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(system.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{}: no certificates found", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
