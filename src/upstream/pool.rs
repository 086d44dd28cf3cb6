//! Keep-alive HTTP/1.1 connections to plain-`http` origins.
//!
//! The forward path's busiest case is a plain-HTTP exchange on a warm connection, and there
//! hyper-util's pooled client (still used for `https` origins, where ALPN may pick HTTP/2)
//! cost ~8,000 instructions per request: a SipHash pool key rebuilt from the URI, a lazily
//! connecting future raced against a checkout future, and a task spawned per response to wait
//! for the connection to turn idle. Here a checkout is an FxHash of the authority the handler
//! already formatted and a pop; the connection goes back when the response body ends, from the
//! body itself ([`Lease::release`]).
//!
//! What the pooled client did that still matters is kept: a request the origin never saw (it
//! closed an idle connection as we picked it) is retried once per stale connection on another
//! one, idle connections expire after `pool_idle_timeout`, and at most
//! `pool_max_idle_per_host` stay open per origin. Added: at most [`MAX_IDLE_TOTAL`] across all
//! origins, or a client naming many origins (ports, wildcard names) could make the proxy hold
//! idle sockets until it runs out of file descriptors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustc_hash::FxBuildHasher;

use super::Upstream;
use crate::error::ProxyError;
use crate::policy::target::Host;

type Sender<B> = http1::SendRequest<B>;

/// Idle connections kept across all origins: well under the open-files limit the binary raises
/// to, and plenty for the origins an egress proxy talks to over plain HTTP.
pub const MAX_IDLE_TOTAL: usize = 1024;

pub struct Pool<B> {
    /// Idle connections by `host:port`, the most recently used last.
    idle: DashMap<String, Vec<Idle<B>>, FxBuildHasher>,
    upstream: Arc<Upstream>,
    idle_timeout: Duration,
    max_idle: usize,
    /// Entries in `idle`, against [`MAX_IDLE_TOTAL`].
    idle_total: AtomicUsize,
}

struct Idle<B> {
    tx: Sender<B>,
    since: Instant,
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
            idle: DashMap::with_hasher(FxBuildHasher),
            upstream,
            idle_timeout,
            max_idle,
            idle_total: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&pool);
        let every = (idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => return,
                }
            }
        });
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
            let (mut tx, reused) = match self.checkout(&key) {
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

    /// The most recently used idle connection to `key` that can take a request now. Closed
    /// and expired ones met on the way are dropped, which closes them.
    fn checkout(&self, key: &str) -> Option<Sender<B>> {
        let mut list = self.idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            self.idle_total.fetch_sub(1, Ordering::Relaxed);
            if i.tx.is_ready() && i.since.elapsed() < self.idle_timeout {
                return Some(i.tx);
            }
        }
        None
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

    fn put(&self, key: String, tx: Sender<B>) {
        // Over the cap the connection is dropped, which closes it.
        if self.max_idle == 0 || self.idle_total.load(Ordering::Relaxed) >= MAX_IDLE_TOTAL {
            return;
        }
        let idle = Idle {
            tx,
            since: Instant::now(),
        };
        // `get_mut` first: the key is usually there, and `entry` would hash and probe again.
        if let Some(mut list) = self.idle.get_mut(&key) {
            if list.len() < self.max_idle {
                list.push(idle);
                self.idle_total.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.idle.entry(key).or_default().push(idle);
        self.idle_total.fetch_add(1, Ordering::Relaxed);
    }

    fn sweep(&self) {
        let timeout = self.idle_timeout;
        self.idle.retain(|_, list| {
            let before = list.len();
            list.retain(|i| !i.tx.is_closed() && i.since.elapsed() < timeout);
            self.idle_total
                .fetch_sub(before - list.len(), Ordering::Relaxed);
            !list.is_empty()
        });
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
            pool.put(key, tx);
        } else if !tx.is_closed() {
            // The connection task has not yet seen the end of the exchange; it is idle as soon
            // as it runs, so wait for that off the request path.
            tokio::spawn(async move {
                if tx.ready().await.is_ok() {
                    pool.put(key, tx);
                }
            });
        }
    }
}
