//! Idle keep-alive connections to origins, by `host:port`: what both plain-HTTP upstream paths
//! ([`super::pool`] for requests with a body, [`super::direct`] for those without) keep between
//! exchanges.
//!
//! A checkout is an FxHash of the authority the handler already formatted and a pop. Idle
//! connections expire after `pool_idle_timeout`, at most `pool_max_idle_per_host` stay open
//! per origin, and at most [`MAX_IDLE_TOTAL`] across all origins, or a client naming many
//! origins (ports, wildcard names) could make the proxy hold idle sockets until it runs out of
//! file descriptors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

/// Idle connections kept across all origins (per upstream path): well under the open-files
/// limit the binary raises to, and plenty for the origins an egress proxy talks to over plain
/// HTTP.
pub const MAX_IDLE_TOTAL: usize = 1024;

/// A connection that can wait in an [`IdleSet`].
pub trait Reusable: Send + Sync + 'static {
    /// True while it can carry another exchange: the origin has not closed it, and sent
    /// nothing unasked.
    fn usable(&mut self) -> bool;
}

pub struct IdleSet<C> {
    /// Idle connections by `host:port`, the most recently used last.
    idle: DashMap<String, Vec<Idle<C>>, FxBuildHasher>,
    timeout: Duration,
    max_per_origin: usize,
    /// Entries in `idle`, against [`MAX_IDLE_TOTAL`].
    total: AtomicUsize,
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

impl<C: Reusable> IdleSet<C> {
    pub fn new(timeout: Duration, max_per_origin: usize) -> IdleSet<C> {
        IdleSet {
            idle: DashMap::with_hasher(FxBuildHasher),
            timeout,
            max_per_origin,
            total: AtomicUsize::new(0),
        }
    }

    /// Starts the task that closes connections left idle too long in the set `owner` holds;
    /// it ends with the owner.
    pub fn sweep_while<T: Send + Sync + 'static>(owner: &Arc<T>, set: fn(&T) -> &IdleSet<C>) {
        let weak: Weak<T> = Arc::downgrade(owner);
        let every = (set(owner).timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(owner) => set(&owner).sweep(),
                    None => return,
                }
            }
        });
    }

    /// The most recently used idle connection to `key` that can take a request now. Closed
    /// and expired ones met on the way are dropped, which closes them.
    pub fn checkout(&self, key: &str) -> Option<C> {
        let mut list = self.idle.get_mut(key)?;
        while let Some(mut i) = list.pop() {
            self.total.fetch_sub(1, Ordering::Relaxed);
            if i.since.elapsed() < self.timeout && i.conn.usable() {
                return Some(i.conn);
            }
        }
        None
    }

    pub fn put(&self, key: String, conn: C) {
        // Over the cap the connection is dropped, which closes it.
        if self.max_per_origin == 0 || self.total.load(Ordering::Relaxed) >= MAX_IDLE_TOTAL {
            return;
        }
        let idle = Idle {
            conn,
            since: Instant::now(),
        };
        // `get_mut` first: the key is usually there, and `entry` would hash and probe again.
        if let Some(mut list) = self.idle.get_mut(&key) {
            if list.len() < self.max_per_origin {
                list.push(idle);
                self.total.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.idle.entry(key).or_default().push(idle);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn sweep(&self) {
        let timeout = self.timeout;
        self.idle.retain(|_, list| {
            let before = list.len();
            list.retain_mut(|i| i.since.elapsed() < timeout && i.conn.usable());
            self.total.fetch_sub(before - list.len(), Ordering::Relaxed);
            !list.is_empty()
        });
    }
}
