//! The connector behind the pooled hyper client: every new upstream connection goes through
//! [`Upstream::connect`] (overrides, guard), then TLS for `https` targets.
//!
//! hyper-util's pool caps idle connections per origin only. A client naming many origins
//! (`https://` absolute-form to one host:port after another) would leave one socket open per
//! origin for `pool_idle_timeout` and run the proxy out of file descriptors. So the connector
//! counts the connections it has open, and one made while [`MAX_IDLE_TOTAL`] are open serves
//! its exchange and is closed instead of pooled: as the plain-HTTP pools do (`idle.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::idle::MAX_IDLE_TOTAL;
use super::Upstream;
use crate::error::ProxyError;
use crate::policy::target::{Host, Scheme};

#[derive(Clone)]
pub struct Connector {
    upstream: Arc<Upstream>,
    /// Connections made by this connector (and its clones) still open.
    open: Arc<AtomicUsize>,
    /// Open connections past which a new one is not pooled.
    max_pooled: usize,
}

impl Connector {
    pub fn new(upstream: Arc<Upstream>) -> Connector {
        Connector::with_max_pooled(upstream, MAX_IDLE_TOTAL)
    }

    fn with_max_pooled(upstream: Arc<Upstream>, max_pooled: usize) -> Connector {
        Connector {
            upstream,
            open: Arc::default(),
            max_pooled,
        }
    }
}

/// A connection the connector made: counted as open until dropped, and pooled only when it
/// was made under the cap.
pub struct Pooled {
    stream: MaybeTls,
    poolable: bool,
    open: Arc<AtomicUsize>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection for Pooled {
    fn connected(&self) -> Connected {
        let c = self.stream.connected();
        if !self.poolable {
            // The pool closes a poisoned connection instead of keeping it.
            c.poison();
        }
        c
    }
}

impl AsyncRead for Pooled {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pooled {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A plain or TLS upstream stream.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for MaybeTls {
    fn connected(&self) -> Connected {
        match self {
            // The pool multiplexes requests over one connection when the origin chose h2.
            MaybeTls::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            _ => Connected::new(),
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Pooled>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let upstream = self.upstream.clone();
        let (open, max_pooled) = (self.open.clone(), self.max_pooled);
        Box::pin(async move {
            let stream = connect(&upstream, &uri).await?;
            let poolable = open.fetch_add(1, Ordering::Relaxed) < max_pooled;
            Ok(TokioIo::new(Pooled {
                stream,
                poolable,
                open,
            }))
        })
    }
}

/// A new connection to `uri`'s origin: TCP through [`Upstream::connect`], then TLS for `https`.
async fn connect(upstream: &Upstream, uri: &Uri) -> Result<MaybeTls, ProxyError> {
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::Https,
        _ => Scheme::Http,
    };
    let host_str = uri.host().unwrap_or_default();
    let host = Host::parse(host_str)?;
    let port = uri.port_u16().unwrap_or(scheme.default_port());
    let (tcp, _) = upstream.connect(&host, port).await?;
    match scheme {
        Scheme::Http => Ok(MaybeTls::Plain(tcp)),
        Scheme::Https => {
            let name = server_name(&host)?;
            let tls = TlsConnector::from(upstream.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| ProxyError::Tls(e.to_string()))?;
            Ok(MaybeTls::Tls(Box::new(tls)))
        }
    }
}

pub fn server_name(host: &Host) -> Result<ServerName<'static>, ProxyError> {
    match host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(n) => {
            ServerName::try_from(n.to_string()).map_err(|e| ProxyError::Tls(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;

    /// An origin for one kept-alive connection, answering each request `200`; the receiver
    /// hears when that connection ends.
    async fn origin() -> (SocketAddr, oneshot::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ended, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(1..) = s.read(&mut buf).await {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                if s.write_all(answer).await.is_err() {
                    break;
                }
            }
            let _ = ended.send(());
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn a_connection_made_past_the_cap_is_closed_not_pooled() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.toml");
        std::fs::write(&config, "[upstream]\nallow_private = [\"127.0.0.0/8\"]\n").unwrap();
        let settings = crate::config::load(&config).unwrap().settings;
        let upstream = Arc::new(Upstream::new(&settings.upstream, Vec::new()).unwrap());
        let client = Client::builder(TokioExecutor::new())
            .build::<_, Empty<Bytes>>(Connector::with_max_pooled(upstream, 2));
        let mut ends = Vec::new();
        for _ in 0..3 {
            let (addr, ended) = origin().await;
            let uri: Uri = format!("http://{addr}/").parse().unwrap();
            let answer = client.get(uri).await.expect("exchange");
            assert_eq!(answer.status(), 200);
            drop(answer);
            ends.push(ended);
        }
        let third = ends.pop().unwrap();
        tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("the third connection, made with two open, was pooled")
            .expect("origin task");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for ended in &mut ends {
            assert!(
                ended.try_recv().is_err(),
                "a connection under the cap was closed"
            );
        }
    }
}
