//! Redis store: limits shared by every replica pointing at the same server.
//!
//! Rate/bytes: one Lua script per check (atomic on the server, EVALSHA via `redis::Script`)
//! runs the same GCRA step as the memory store, in microseconds (Lua numbers are doubles:
//! epoch microseconds fit their 53 bits, nanoseconds would not). The clock is the server's
//! `TIME`, so replicas with skewed clocks still agree. Each key expires (`PX`) when its TAT
//! passes, which is exactly when its state stops mattering.
//!
//! Concurrent: each slot in flight is a lease, a member of a sorted set: a token unique to the
//! acquire, scored by the server's `TIME` (ms) when it was taken. The acquire script drops the
//! leases older than `concurrent_ttl`, counts the rest and adds its token if under the cap (and
//! sets the key to expire with its newest lease); the permit's drop spawns the `ZREM` of its
//! token. The key is the hashed key plus `:slots`: the `INCR` counters of older versions are
//! plain strings under the bare key, so the two never meet (during a rolling upgrade old and new
//! replicas count apart; the old counters expire by themselves).
//!
//! A failed or timed-out acquire may still run on the server (it was sent: a stalled Redis runs
//! it when it wakes), so the failure spawns a best-effort `ZREM` of its token (`abandon`): on
//! the same connection it is ordered after the late script, and it is a no-op if the script
//! never ran or took no slot. Last resort, when a release never arrives (the replica died, or
//! Redis could not be reached): the lease stops counting `concurrent_ttl` after it was taken,
//! however busy the key. So `concurrent_ttl` must exceed the longest exchange you expect to
//! hold a slot (a long tunnel), and bounds how long a lost release can occupy a slot.
//!
//! Outages: every call is bounded by `timeout`; an error or a timeout applies
//! `on_store_error` and is counted. `redis::aio::ConnectionManager` reconnects in the
//! background.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::gcra::Op;
use super::key::redis_key;
use super::{
    ErrorCount, Gcra, KeyValues, LimitError, LimitSpec, OnStoreError, Permit, Release, Verdict,
};

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub on_store_error: OnStoreError,
    /// Longest a check may wait on Redis before `on_store_error` applies.
    pub timeout: Duration,
    /// Lease of an in-flight slot: a slot whose release never reaches Redis stops counting
    /// this long after it was taken (see the module docs).
    pub concurrent_ttl: Duration,
    /// Incremented with every store error (`portcullis_limit_store_errors_total`).
    pub errors_metric: Option<prometheus::IntCounter>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            on_store_error: OnStoreError::Allow,
            timeout: Duration::from_millis(250),
            concurrent_ttl: Duration::from_secs(3600),
            errors_metric: None,
        }
    }
}

/// ARGV: increment, tolerance (µs), op (r = reserve, c = charge, p = peek).
/// Returns {allowed 1/0, wait µs}. Mirrors `gcra::step`.
const GCRA_LUA: &str = r#"
local inc = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local op = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if op == 'p' then
  local used = tat - now
  if used >= tol then return {0, used - tol + 1} end
  return {1, 0}
end
local new = tat + inc
local ahead = new - now
if op == 'r' and ahead > tol then
  if inc > tol then return {0, tol} end
  return {0, ahead - tol}
end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.max(1, math.ceil(ahead / 1000)))
if ahead > tol then return {0, ahead - tol} end
return {1, 0}
"#;

/// KEYS[1]: the set of leases. ARGV: max, lease ms, token. Returns 1 if the token took a slot.
/// Scores are the server's `TIME` in ms (replicas with skewed clocks agree); the key expires
/// with its newest lease (an empty sorted set is deleted by Redis itself).
const ACQUIRE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"#;

/// Waits before the retries of the `ZREM` that takes back a failed acquire: the first goes out
/// at once (on the same connection, right behind the script), the retries cover a connection
/// that was replaced meanwhile or a Redis still stalled.
const ABANDON_RETRIES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(5)];

/// Most take-backs waiting to retry at once (an outage fails every acquire): past it, a
/// take-back whose first `ZREM` fails leaves the slot to its lease.
const ABANDON_RETRYING_MAX: usize = 1024;

struct Shared {
    conn: ConnectionManager,
    cfg: RedisConfig,
    errors: ErrorCount,
    last_log: AtomicU64,
    epoch: Instant,
    gcra: Script,
    acquire: Script,
    /// Random per store (128 bits) and a counter: lease tokens unique across replicas.
    instance: String,
    next_token: AtomicU64,
    /// Take-backs of failed acquires waiting to retry (see `abandon`).
    abandon_retrying: AtomicUsize,
}

pub(crate) struct RedisStore {
    shared: Arc<Shared>,
    pub(crate) errors: ErrorView,
}

/// Read access to the error count from `Limiter::store_errors`.
pub(crate) struct ErrorView(Arc<Shared>);

impl ErrorView {
    pub(crate) fn get(&self) -> u64 {
        self.0.errors.get()
    }
}

impl RedisStore {
    pub(crate) async fn connect(url: &str, cfg: RedisConfig) -> Result<RedisStore, LimitError> {
        let client = redis::Client::open(url).map_err(|source| LimitError::RedisUrl {
            url: crate::secrets::redact_url_password(url),
            source,
        })?;
        // Bounded waits everywhere: a dead server must cost a check at most `timeout`.
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, mcfg)?;
        let shared = Arc::new(Shared {
            conn,
            errors: ErrorCount::new(cfg.errors_metric.clone()),
            cfg,
            last_log: AtomicU64::new(0),
            epoch: Instant::now(),
            gcra: Script::new(GCRA_LUA),
            acquire: Script::new(ACQUIRE_LUA),
            instance: instance_id(),
            next_token: AtomicU64::new(0),
            abandon_retrying: AtomicUsize::new(0),
        });
        // Connect now so the first request does not pay for it, but start either way: an
        // outage at startup is handled like any other (the proxy must keep serving).
        let mut conn = shared.conn.clone();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        match tokio::time::timeout(shared.cfg.timeout, ping).await {
            Ok(Ok(_)) => tracing::info!("limit store: redis reachable"),
            Ok(Err(e)) => tracing::warn!(error = %e, "limit store: redis unreachable at startup"),
            Err(_) => tracing::warn!("limit store: redis did not answer at startup"),
        }
        Ok(RedisStore {
            errors: ErrorView(shared.clone()),
            shared,
        })
    }

    pub(crate) async fn gcra(
        &self,
        spec: &LimitSpec,
        keys: &KeyValues<'_>,
        g: &Gcra,
        cost: u64,
        op: Op,
    ) -> Verdict {
        let (inc, tol) = g.params(cost, 1_000);
        let key = redis_key(spec, keys);
        let mut conn = self.shared.conn.clone();
        let mut call = self.shared.gcra.key(&key);
        call.arg(inc).arg(tol).arg(op.code());
        let res = self
            .shared
            .bounded(call.invoke_async::<(i64, i64)>(&mut conn))
            .await;
        match res {
            Some((1, _)) => Verdict::Allowed,
            Some((_, wait_us)) => {
                Verdict::denied_after(Duration::from_micros(wait_us.max(0) as u64))
            }
            None => self.shared.on_error(),
        }
    }

    pub(crate) async fn acquire(
        &self,
        spec: &LimitSpec,
        keys: &KeyValues<'_>,
        max: u32,
    ) -> Result<Permit, Verdict> {
        let key = format!("{}:slots", redis_key(spec, keys));
        let token = self.shared.token();
        let ttl_ms = self.shared.cfg.concurrent_ttl.as_millis().max(1) as u64;
        let mut conn = self.shared.conn.clone();
        let mut call = self.shared.acquire.key(&key);
        call.arg(max).arg(ttl_ms).arg(&token);
        match self
            .shared
            .bounded(call.invoke_async::<i64>(&mut conn))
            .await
        {
            Some(1) => Ok(Permit {
                release: tokio::runtime::Handle::try_current().ok().map(|rt| {
                    Release::Redis(RedisRelease {
                        shared: self.shared.clone(),
                        key,
                        token,
                        rt,
                    })
                }),
            }),
            Some(_) => Err(Verdict::denied_after(Duration::ZERO)),
            None => {
                // The script may still run (late): take back whatever it takes.
                abandon(self.shared.clone(), key, token);
                match self.shared.on_error() {
                    Verdict::Allowed => Ok(Permit::none()),
                    denied => Err(denied),
                }
            }
        }
    }
}

/// 128 random bits (std's `RandomState` keys come from the OS), in hex.
fn instance_id() -> String {
    let seed = (std::process::id(), Instant::now());
    let (a, b) = (RandomState::new(), RandomState::new());
    format!("{:016x}{:016x}", a.hash_one(seed), b.hash_one(seed))
}

/// Takes back the lease `token` may hold under `key` after its acquire failed: best effort, in
/// the background, and not counted as a store error (the acquire already was). A `ZREM` of a
/// token the script never added does nothing, so it is sent whether or not the script ran.
fn abandon(shared: Arc<Shared>, key: String, token: String) {
    tokio::spawn(async move {
        let zrem = zrem(&key, &token);
        if shared.answered(&zrem).await {
            return;
        }
        if shared.abandon_retrying.fetch_add(1, Ordering::Relaxed) >= ABANDON_RETRYING_MAX {
            shared.abandon_retrying.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        for wait in ABANDON_RETRIES {
            tokio::time::sleep(wait).await;
            if shared.answered(&zrem).await {
                break;
            }
        }
        shared.abandon_retrying.fetch_sub(1, Ordering::Relaxed);
    });
}

fn zrem(key: &str, token: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("ZREM");
    cmd.arg(key).arg(token);
    cmd
}

impl Shared {
    fn token(&self) -> String {
        let n = self.next_token.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.instance)
    }

    /// Sends `cmd` and tells whether Redis answered it within `timeout`; errors uncounted.
    async fn answered(&self, cmd: &redis::Cmd) -> bool {
        let mut conn = self.conn.clone();
        let reply = cmd.query_async::<redis::Value>(&mut conn);
        matches!(
            tokio::time::timeout(self.cfg.timeout, reply).await,
            Ok(Ok(_))
        )
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.error(&e);
                None
            }
            Err(_) => {
                self.error(&"timed out");
                None
            }
        }
    }

    fn error(&self, e: &dyn std::fmt::Display) {
        self.errors.inc();
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_log.load(Ordering::Relaxed);
        // First error, then at most one line per 10 s: an outage must not flood the log.
        if (last == 0 || now.saturating_sub(last) >= 10_000)
            && self
                .last_log
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                error = %e,
                errors_total = self.errors.get(),
                on_store_error = ?self.cfg.on_store_error,
                "limit store error"
            );
        }
    }

    fn on_error(&self) -> Verdict {
        match self.cfg.on_store_error {
            OnStoreError::Allow => Verdict::Allowed,
            OnStoreError::Deny => Verdict::Unavailable,
        }
    }
}

/// Gives a slot back when its permit drops. Drop cannot await, so the `ZREM` runs on a task
/// spawned on the runtime that acquired it; if it fails the slot stays counted until its
/// lease ends (see the module docs).
pub(crate) struct RedisRelease {
    shared: Arc<Shared>,
    key: String,
    token: String,
    rt: tokio::runtime::Handle,
}

impl RedisRelease {
    pub(crate) fn release(self) {
        let RedisRelease {
            shared,
            key,
            token,
            rt,
        } = self;
        rt.spawn(async move {
            let mut conn = shared.conn.clone();
            let zrem = zrem(&key, &token);
            shared.bounded(zrem.query_async::<i64>(&mut conn)).await;
        });
    }
}
