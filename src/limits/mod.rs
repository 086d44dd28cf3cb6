//! Rate limits and quotas: one engine ([`Limiter`]) over two stores (in-process memory, or a
//! shared Redis for limits that hold across replicas).
//!
//! Three kinds of limit ([`LimitKind`]):
//! - `Rate`: GCRA (generic cell rate algorithm). A key's whole state is one number, its
//!   theoretical arrival time (TAT). A request of cost `c` advances the TAT by `c` emission
//!   intervals and passes when the advanced TAT is no further ahead of now than `burst`
//!   intervals. Check and charge are one atomic step, so concurrent requests can never slip
//!   past (reserve before forwarding, never charge after the response).
//! - `Bytes`: the same GCRA over bytes, but charged after the fact as bytes flow: the bytes
//!   were already delivered, so they are always charged, and the verdict tells the caller to cut
//!   the stream once the budget is overdrawn.
//! - `Concurrent`: an in-flight cap; [`Limiter::acquire`] hands out an RAII [`Permit`].
//!
//! State is keyed by (spec id, a hash of the limit's definition, the key values), so a policy
//! reload that keeps a limit's definition keeps its counters and a changed definition starts
//! fresh; the owner must therefore keep ONE `Limiter` across reloads.

mod gcra;
mod key;
mod memory;
mod redis_store;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use gcra::Gcra;
pub use memory::MemoryConfig;
pub use redis_store::RedisConfig;

use memory::MemoryStore;
use redis_store::RedisStore;

/// One limit's definition, compiled from config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    /// Unique per policy (e.g. `openai-bulk` or `openai-bulk#0`): the state key prefix and the
    /// name an audit record gives as the limit that tripped.
    pub id: Arc<str>,
    pub kind: LimitKind,
    /// Composite key: `[Client]`, `[User, Vendor]`, …; empty means one bucket shared by all.
    pub by: Vec<KeyPart>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `requests` per `per`, allowing bursts of up to `burst` (config default: `requests`).
    Rate {
        requests: u64,
        per: Duration,
        burst: u64,
    },
    /// Response (or tunnel) bytes per period, charged as bytes flow.
    Bytes { bytes: u64, per: Duration },
    /// Requests (or tunnels) in flight at once.
    Concurrent { max: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// The client's source address.
    Client,
    /// The authenticated proxy user; falls back to the client address when absent.
    User,
    /// The API-key fingerprint; falls back to the client address when absent.
    Key,
    /// The vendor; requests with no vendor share one bucket.
    Vendor,
}

/// The values a request supplies for the key parts.
#[derive(Debug, Clone, Copy)]
pub struct KeyValues<'a> {
    pub client: IpAddr,
    pub user: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub vendor: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// `retry_after` is already rounded for the `Retry-After` header: whole seconds, at least 1
    /// (see [`Verdict::retry_after_secs`]).
    Denied {
        retry_after: Duration,
    },
    /// The store could not answer and `on_store_error = "deny"`: refused, but not because the
    /// client used up anything, so it is told (and audited) apart from a rate limit.
    Unavailable,
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }

    /// The value for the `Retry-After` header (`None` when allowed).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Verdict::Allowed => None,
            Verdict::Denied { retry_after } => Some(retry_after.as_secs().max(1)),
            Verdict::Unavailable => Some(1),
        }
    }

    /// A denial that waits `wait`: rounded up to whole seconds, at least one second, because
    /// `Retry-After` carries whole seconds and "0" would invite an immediate, futile retry.
    pub(crate) fn denied_after(wait: Duration) -> Verdict {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Verdict::Denied {
            retry_after: Duration::from_secs(secs.max(1)),
        }
    }
}

/// What the engine does with a request when its store cannot answer (Redis down or slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Fail open: the proxy keeps serving, the limit is not enforced meanwhile.
    #[default]
    Allow,
    /// Fail closed: every request under a limit is denied (Retry-After: 1) meanwhile.
    Deny,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("invalid redis url {url:?}: {source}")]
    RedisUrl {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Counts store errors for `portcullis_limit_store_errors_total`.
#[derive(Debug, Default)]
pub(crate) struct ErrorCount {
    count: AtomicU64,
    metric: Option<prometheus::IntCounter>,
}

impl ErrorCount {
    fn new(metric: Option<prometheus::IntCounter>) -> Self {
        ErrorCount {
            count: AtomicU64::new(0),
            metric,
        }
    }
    pub(crate) fn inc(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metric {
            m.inc();
        }
    }
    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

enum Store {
    Memory(Arc<MemoryStore>),
    Redis(RedisStore),
}

/// The limit engine. Cheap to share (`Arc<Limiter>`); keep one across policy reloads.
pub struct Limiter {
    store: Store,
}

impl Limiter {
    /// An in-process limiter. Spawns an idle-key sweeper when called inside a Tokio runtime
    /// (the task ends when the limiter is dropped); outside one, only the cap-time sweep runs.
    pub fn memory(cfg: MemoryConfig) -> Limiter {
        Limiter {
            store: Store::Memory(MemoryStore::new(cfg)),
        }
    }

    /// A limiter over a shared Redis (`redis://host:port/db`). Fails only on a malformed URL:
    /// an unreachable server at startup is logged and handled like any later outage
    /// (`on_store_error`), so the proxy starts and keeps serving while Redis is down.
    pub async fn redis(url: &str, cfg: RedisConfig) -> Result<Limiter, LimitError> {
        Ok(Limiter {
            store: Store::Redis(RedisStore::connect(url, cfg).await?),
        })
    }

    /// Reserve before forwarding. `Rate`: atomically checks and charges `cost` requests.
    /// `Bytes`: charges nothing, denies while the byte budget is used up (so a new request or
    /// tunnel is refused before it starts). `Concurrent`: always allowed (use [`acquire`]).
    ///
    /// [`acquire`]: Limiter::acquire
    pub async fn check(&self, spec: &LimitSpec, keys: &KeyValues<'_>, cost: u64) -> Verdict {
        let op = match spec.kind {
            LimitKind::Rate { .. } => gcra::Op::Reserve,
            LimitKind::Bytes { .. } => gcra::Op::Peek,
            LimitKind::Concurrent { .. } => return Verdict::Allowed,
        };
        self.gcra(spec, keys, cost, op).await
    }

    /// Charge `bytes` that have already flowed against a `Bytes` limit. Always charges;
    /// returns `Denied` once the budget is overdrawn, and the caller then closes the
    /// stream/tunnel and audits. On any other kind it is a no-op that allows.
    pub async fn charge_bytes(
        &self,
        spec: &LimitSpec,
        keys: &KeyValues<'_>,
        bytes: u64,
    ) -> Verdict {
        match spec.kind {
            LimitKind::Bytes { .. } => self.gcra(spec, keys, bytes, gcra::Op::Charge).await,
            _ => Verdict::Allowed,
        }
    }

    async fn gcra(
        &self,
        spec: &LimitSpec,
        keys: &KeyValues<'_>,
        cost: u64,
        op: gcra::Op,
    ) -> Verdict {
        let Some(g) = Gcra::from_kind(&spec.kind) else {
            return Verdict::Allowed;
        };
        match &self.store {
            Store::Memory(m) => m.gcra(spec, keys, &g, cost, op),
            Store::Redis(r) => r.gcra(spec, keys, &g, cost, op).await,
        }
    }

    /// Take an in-flight slot of a `Concurrent` limit: the permit releases it when dropped
    /// (hold it for the whole exchange, i.e. until the response body or tunnel ends). On any
    /// other kind it returns a permit that holds nothing.
    pub async fn acquire(&self, spec: &LimitSpec, keys: &KeyValues<'_>) -> Result<Permit, Verdict> {
        let LimitKind::Concurrent { max } = spec.kind else {
            return Ok(Permit::none());
        };
        match &self.store {
            Store::Memory(m) => m.acquire(spec, keys, max),
            Store::Redis(r) => r.acquire(spec, keys, max).await,
        }
    }

    /// Store errors so far (`portcullis_limit_store_errors_total`); always 0 for memory.
    pub fn store_errors(&self) -> u64 {
        match &self.store {
            Store::Memory(_) => 0,
            Store::Redis(r) => r.errors.get(),
        }
    }

    /// Keys held in memory (rate/byte states plus in-flight counters); 0 for Redis.
    pub fn key_count(&self) -> usize {
        match &self.store {
            Store::Memory(m) => m.key_count(),
            Store::Redis(_) => 0,
        }
    }

    /// Requests charged to a shared overflow bucket because the memory table was full of
    /// live keys (see [`MemoryConfig::max_keys`]); 0 for Redis.
    pub fn overflowed(&self) -> u64 {
        match &self.store {
            Store::Memory(m) => m.overflowed(),
            Store::Redis(_) => 0,
        }
    }

    /// Drop idle memory state now (the background sweeper does this periodically).
    /// Returns how many keys were removed; 0 for Redis (its keys expire by TTL).
    pub fn sweep(&self) -> usize {
        match &self.store {
            Store::Memory(m) => m.sweep(),
            Store::Redis(_) => 0,
        }
    }

    /// Whether this limiter is backed by Redis (for `/readyz` or `explain`).
    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Redis(_))
    }
}

/// An in-flight slot; dropping it releases the slot.
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct Permit {
    release: Option<Release>,
}

enum Release {
    Memory(Arc<MemoryStore>, memory::Held),
    Redis(redis_store::RedisRelease),
}

impl Permit {
    /// A permit that holds nothing (limits of other kinds, or a store error with `Allow`).
    pub fn none() -> Permit {
        Permit { release: None }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("holds", &self.release.is_some())
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.release.take() {
            None => {}
            Some(Release::Memory(store, held)) => store.release(held),
            Some(Release::Redis(r)) => r.release(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handler moves permits into body/tunnel tasks and shares the limiter across them.
    #[test]
    fn engine_types_cross_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Limiter>();
        send_sync::<Permit>();
        send_sync::<LimitSpec>();
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_at_least_one() {
        let s = |d| Verdict::denied_after(d).retry_after_secs().unwrap();
        assert_eq!(s(Duration::from_nanos(1)), 1);
        assert_eq!(s(Duration::ZERO), 1);
        assert_eq!(s(Duration::from_millis(1000)), 1);
        assert_eq!(s(Duration::from_millis(1001)), 2);
        assert_eq!(s(Duration::from_secs(59)), 59);
        assert_eq!(Verdict::Allowed.retry_after_secs(), None);
    }
}
