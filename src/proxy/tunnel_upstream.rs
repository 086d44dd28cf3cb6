//! An intercepted tunnel's own connections to its origin.
//!
//! Inside the tunnel the client may speak HTTP/2 (the leaf offers it) while the origin speaks
//! only HTTP/1.1. Then every stream in flight needs an upstream connection of its own: a
//! client with 250 streams made hyper-util's pool open a TLS connection per stream and close
//! all but the idle few as each answer ended: up to 12,000 descriptors, each a TLS handshake,
//! at a quarter of the requests/s the queue below gets. A browser holds 6 connections per origin
//! and queues the rest; so does the tunnel here, with [`MAX_CONNECTIONS`], and keeps that many
//! idle so that a steady load reuses them. (A slot is given back when the exchange ends, and
//! hyper-util puts the connection back in its pool from a task of its own: a request that
//! starts in between opens one more, which the idle cap closes later.)
//!
//! An origin that answers over HTTP/2 multiplexes every stream on one connection: once one
//! answer says so, requests stop taking a slot and those queued go on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::{Counted, RequestBody};
use super::HttpsClient;
use crate::config::UpstreamSettings;
use crate::upstream::Upstream;

/// Requests one tunnel has in flight to an origin not known to speak HTTP/2, and connections
/// it keeps idle. More than a browser's 6: an API client batching over one HTTP/2 connection
/// expects more in flight than a page load does.
pub const MAX_CONNECTIONS: usize = 32;

pub struct TunnelUpstream {
    client: HttpsClient,
    /// One per request in flight while each may be a connection of its own. Closed once the
    /// origin is known to multiplex.
    slots: Arc<Semaphore>,
    multiplexed: AtomicBool,
}

/// An HTTP/1.1 upstream connection's place in its tunnel: held until the exchange on it has
/// ended both ways, then given to the next request queued.
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
}

impl TunnelUpstream {
    pub fn new(upstream: Arc<Upstream>, settings: &UpstreamSettings) -> TunnelUpstream {
        TunnelUpstream {
            client: super::https_client(upstream, settings, MAX_CONNECTIONS),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            multiplexed: AtomicBool::new(false),
        }
    }

    /// Sends `req`, first waiting for a connection slot unless the origin multiplexes. The
    /// slot comes back with an HTTP/1.1 answer, for the exchange to hold.
    pub async fn send(
        &self,
        req: Request<Counted<RequestBody>>,
    ) -> Result<(Response<Incoming>, Option<ConnectionSlot>), hyper_util::client::legacy::Error>
    {
        let slot = if self.multiplexed.load(Ordering::Relaxed) {
            None
        } else {
            // Closed (`Err`) once the origin turned out to multiplex.
            self.slots.clone().acquire_owned().await.ok()
        };
        let resp = self.client.request(req).await?;
        if resp.version() == Version::HTTP_2 {
            if !self.multiplexed.swap(true, Ordering::Relaxed) {
                self.slots.close();
            }
            return Ok((resp, None));
        }
        Ok((resp, slot.map(|p| ConnectionSlot { _permit: p })))
    }
}
