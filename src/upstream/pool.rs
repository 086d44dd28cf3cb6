//! Keep-alive HTTP/1.1 connections to plain-`http` origins for requests with a body, on
//! hyper's client connection: it streams the upload while it reads an answer the origin may
//! send before the upload ends. (Requests without a body take [`super::direct`].)
//!
//! hyper-util's pooled client (still used for `https` origins, where ALPN may pick HTTP/2)
//! cost ~8,000 instructions per request: a SipHash pool key rebuilt from the URI, a lazily
//! connecting future raced against a checkout future, and a task spawned per response to wait
//! for the connection to turn idle. Here the connection goes back to an [`IdleSet`] when the
//! response body ends, from the body itself ([`Lease::release`]).
//!
//! What the pooled client did that still matters is kept: a request the origin never saw (it
//! closed an idle connection as we picked it) is retried once per stale connection on another
//! one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::idle::{IdleSet, Reusable};
use super::Upstream;
use crate::error::ProxyError;
use crate::policy::target::Host;

type Sender<B> = http1::SendRequest<B>;

pub struct Pool<B> {
    idle: IdleSet<Sender<B>>,
    upstream: Arc<Upstream>,
}

impl<B: Send + 'static> Reusable for Sender<B> {
    fn usable(&mut self) -> bool {
        // hyper's connection task reads the idle socket: a close or unasked bytes end it.
        self.is_ready()
    }
}

/// The connection an exchange is using, until its response body ends.
pub struct Lease<B: 'static> {
    tx: Sender<B>,
    key: String,
    pool: Weak<Pool<B>>,
}

impl<B> Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool, and the task that closes connections left idle too long (it ends with the pool).
    pub fn new(upstream: Arc<Upstream>, idle_timeout: Duration, max_idle: usize) -> Arc<Pool<B>> {
        let pool = Arc::new(Pool {
            idle: IdleSet::new(idle_timeout, max_idle),
            upstream,
        });
        IdleSet::sweep_while(&pool, |p: &Pool<B>| &p.idle);
        pool
    }

    /// Sends `req` (origin-form URI, `Host` set) to `host:port` (`key` is its authority) on an
    /// idle connection or a new one. Returns the response head and the connection's lease.
    pub async fn send(
        self: &Arc<Self>,
        key: String,
        host: &Host,
        port: u16,
        mut req: Request<B>,
    ) -> Result<(Response<Incoming>, Lease<B>), ProxyError> {
        loop {
            let (mut tx, reused) = match self.idle.checkout(&key) {
                Some(tx) => (tx, true),
                // Boxed: the connect future is large and rare; the send future moves per request.
                None => (Box::pin(self.connect(host, port)).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        tx,
                        key,
                        pool: Arc::downgrade(self),
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // The origin closed the idle connection before our request went out:
                    // nothing was sent, so another connection may carry it.
                    Some(r) if reused => req = r,
                    _ => return Err(super::hyper_error(&e.into_error())),
                },
            }
        }
    }

    async fn connect(&self, host: &Host, port: u16) -> Result<Sender<B>, ProxyError> {
        let (tcp, _) = self.upstream.connect(host, port).await?;
        let (tx, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| super::hyper_error(&e))?;
        // The connection task ends when the origin closes or every sender is gone.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(tx)
    }
}

impl<B> Lease<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The response body ended as it should: the connection may carry another exchange.
    /// (A lease dropped instead, with the body cut short, closes its connection.)
    pub fn release(self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let Lease { mut tx, key, .. } = self;
        if tx.is_ready() {
            pool.idle.put(key, tx);
        } else if !tx.is_closed() {
            // The connection task has not yet seen the end of the exchange; it is idle as soon
            // as it runs, so wait for that off the request path.
            tokio::spawn(async move {
                if tx.ready().await.is_ok() {
                    pool.idle.put(key, tx);
                }
            });
        }
    }
}
