//! In-process store: dashmap shards, one GCRA TAT (u64 nanoseconds since the store's epoch)
//! per key, updated under the key's shard lock (no global lock).
//!
//! Bounded: at most `max_keys` per-key entries. Idle keys — a TAT in the past carries no
//! information, the key is indistinguishable from a fresh one — are removed by a periodic
//! sweep and, when the table is full, by an inline sweep first. If the table is still full of
//! live keys, a new key is charged against a shared overflow bucket of its limit (same
//! definition, one per limit) instead of getting state of its own. That bucket is strictly
//! tighter than the key's own would be, so a flood of distinct keys can never slip past a
//! limit (never fail open); the flood's own requests throttle each other instead. Every such
//! request is counted ([`Limiter::overflowed`](super::Limiter::overflowed)) and logged.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::gcra::{self, Op};
use super::key::{overflow_key, state_key};
use super::{Gcra, KeyValues, LimitSpec, Permit, Release, Verdict};

#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Most per-key entries held (rate/byte states plus in-flight counters). Overflow
    /// buckets (at most one per limit definition) come on top.
    pub max_keys: usize,
    /// How often the background sweeper drops idle keys.
    pub sweep_interval: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(5),
        }
    }
}

/// 128 bits of keyed hash, laid out as two u64 so an entry is 24 bytes (a u128 would be
/// 16-aligned and pad each entry to 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemKey(u64, u64);

impl MemKey {
    fn from(k: u128) -> MemKey {
        MemKey((k >> 64) as u64, k as u64)
    }
}

impl Hash for MemKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Already a uniform keyed hash: hand the map one half as is (see `PassThrough`).
        h.write_u64(self.0);
    }
}

/// Hashing a hash again would only cost time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PassThrough;

#[derive(Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for MemKey; kept correct for any other input.
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher::default()
    }
}

type Map<V> = DashMap<MemKey, V, PassThrough>;

/// An in-flight slot held by a permit.
pub(crate) struct Held {
    key: MemKey,
    /// Whether the entry counts against `max_keys` (overflow entries do not).
    counted: bool,
}

pub(crate) struct MemoryStore {
    epoch: Instant,
    tats: Map<u64>,
    inflight: Map<u32>,
    /// Overflow buckets' TATs (one per limit definition that ever overflowed; swept when idle).
    overflow: Map<u64>,
    /// Entries in `tats` + `inflight`: reserved before an insert so the cap holds exactly
    /// under concurrent inserts.
    len: AtomicUsize,
    max_keys: usize,
    /// When the last inline (table-full) sweep ran, so a flood sweeps at most every 100 ms.
    last_full_sweep: AtomicU64,
    sweeping: AtomicBool,
    overflowed: AtomicU64,
    last_overflow_log: AtomicU64,
}

const FULL_SWEEP_EVERY_NS: u64 = 100_000_000;

impl MemoryStore {
    pub(crate) fn new(cfg: MemoryConfig) -> Arc<MemoryStore> {
        let store = Arc::new(MemoryStore {
            epoch: Instant::now(),
            tats: DashMap::with_hasher(PassThrough),
            inflight: DashMap::with_hasher(PassThrough),
            overflow: DashMap::with_hasher(PassThrough),
            len: AtomicUsize::new(0),
            max_keys: cfg.max_keys,
            last_full_sweep: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            overflowed: AtomicU64::new(0),
            last_overflow_log: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweeper(Arc::downgrade(&store), cfg.sweep_interval));
        }
        store
    }

    fn now(&self) -> u64 {
        // u64 nanoseconds last 584 years of uptime.
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(crate) fn gcra(
        &self,
        spec: &LimitSpec,
        keys: &KeyValues<'_>,
        g: &Gcra,
        cost: u64,
        op: Op,
    ) -> Verdict {
        let (inc, tol) = g.params(cost, 1);
        let key = MemKey::from(state_key(spec, keys));
        let now = self.now();
        // Common path: the key exists; the shard write lock makes check-and-charge atomic.
        if let Some(mut tat) = self.tats.get_mut(&key) {
            return apply(&mut tat, now, inc, tol, op);
        }
        // A fresh key that would store nothing (denied, or a peek) needs no entry.
        let fresh = gcra::step(None, now, inc, tol, op);
        if fresh.store.is_none() {
            return verdict(fresh.wait);
        }
        if self.reserve() {
            match self.tats.entry(key) {
                Entry::Occupied(mut e) => {
                    // Another task inserted it meanwhile: its state wins, re-run on it.
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    apply(e.get_mut(), now, inc, tol, op)
                }
                Entry::Vacant(e) => {
                    let s = gcra::step(None, now, inc, tol, op);
                    if let Some(t) = s.store {
                        e.insert(t);
                    }
                    verdict(s.wait)
                }
            }
        } else {
            self.note_overflow(spec);
            let mut tat = self
                .overflow
                .entry(MemKey::from(overflow_key(spec)))
                .or_insert(0);
            apply(&mut tat, now, inc, tol, op)
        }
    }

    pub(crate) fn acquire(
        self: &Arc<Self>,
        spec: &LimitSpec,
        keys: &KeyValues<'_>,
        max: u32,
    ) -> Result<Permit, Verdict> {
        let key = MemKey::from(state_key(spec, keys));
        if let Some(mut n) = self.inflight.get_mut(&key) {
            return self.take(&mut n, max, key, true);
        }
        if max == 0 {
            return Err(Verdict::denied_after(Duration::ZERO));
        }
        let (key, counted) = if self.reserve() {
            (key, true)
        } else {
            self.note_overflow(spec);
            (MemKey::from(overflow_key(spec)), false)
        };
        match self.inflight.entry(key) {
            Entry::Occupied(mut e) => {
                if counted {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
                self.take(e.get_mut(), max, key, counted)
            }
            Entry::Vacant(e) => {
                e.insert(1);
                Ok(self.permit(key, counted))
            }
        }
    }

    fn take(
        self: &Arc<Self>,
        n: &mut u32,
        max: u32,
        key: MemKey,
        counted: bool,
    ) -> Result<Permit, Verdict> {
        if *n < max {
            *n += 1;
            Ok(self.permit(key, counted))
        } else {
            // No time is known at which a slot frees up: ask for the minimum.
            Err(Verdict::denied_after(Duration::ZERO))
        }
    }

    fn permit(self: &Arc<Self>, key: MemKey, counted: bool) -> Permit {
        Permit {
            release: Some(Release::Memory(self.clone(), Held { key, counted })),
        }
    }

    pub(crate) fn release(&self, held: Held) {
        let removed = self.inflight.remove_if_mut(&held.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        // Entries for keys whose slot count drops to zero go at once: in-flight state is
        // bounded by the requests in flight, with no sweep needed.
        if removed.is_some() && held.counted {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes one slot of `max_keys`, sweeping idle keys first if the table is full.
    fn reserve(&self) -> bool {
        let try_take = || {
            self.len
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < self.max_keys).then_some(n + 1)
                })
                .is_ok()
        };
        if try_take() {
            return true;
        }
        let now = self.now();
        let last = self.last_full_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= FULL_SWEEP_EVERY_NS
            && self
                .last_full_sweep
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep();
        }
        try_take()
    }

    /// Drops idle keys (TAT not after now). Returns how many per-key entries it removed.
    pub(crate) fn sweep(&self) -> usize {
        // One sweep at a time: two concurrent full scans would only double the lock holding.
        if self.sweeping.swap(true, Ordering::Acquire) {
            return 0;
        }
        let now = self.now();
        let mut removed = 0usize;
        self.tats.retain(|_, tat| {
            let keep = *tat > now;
            removed += usize::from(!keep);
            keep
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
        self.overflow.retain(|_, tat| *tat > now);
        self.sweeping.store(false, Ordering::Release);
        removed
    }

    fn note_overflow(&self, spec: &LimitSpec) {
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let last = self.last_overflow_log.load(Ordering::Relaxed);
        // At most one warning per 10 s: a flood must not become a log flood.
        if now.saturating_sub(last) >= 10_000_000_000
            && self
                .last_overflow_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                limit = %spec.id,
                max_keys = self.max_keys,
                "limit table full of live keys: new keys share the limit's overflow bucket"
            );
        }
    }

    pub(crate) fn key_count(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub(crate) fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

fn apply(tat: &mut u64, now: u64, inc: u64, tol: u64, op: Op) -> Verdict {
    let s = gcra::step(Some(*tat), now, inc, tol, op);
    if let Some(t) = s.store {
        *tat = t;
    }
    verdict(s.wait)
}

fn verdict(wait_ns: Option<u64>) -> Verdict {
    match wait_ns {
        None => Verdict::Allowed,
        Some(ns) => Verdict::denied_after(Duration::from_nanos(ns)),
    }
}

async fn sweeper(store: Weak<MemoryStore>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { break };
        // A sweep of a million keys takes milliseconds: keep it off the async workers.
        let swept = tokio::task::spawn_blocking(move || store.sweep()).await;
        if let Ok(n) = swept {
            if n > 0 {
                tracing::debug!(removed = n, "limit sweep");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{KeyPart, LimitKind, Limiter};
    use super::*;

    fn rate(id: &str, requests: u64, per: Duration) -> LimitSpec {
        LimitSpec {
            id: Arc::from(id),
            kind: LimitKind::Rate {
                requests,
                per,
                burst: requests,
            },
            by: vec![KeyPart::Client],
        }
    }

    fn kv(i: u32) -> KeyValues<'static> {
        KeyValues {
            client: std::net::IpAddr::V4(i.into()),
            user: None,
            key_id: None,
            vendor: None,
        }
    }

    #[tokio::test]
    async fn full_table_overflows_conservatively_then_recovers_after_sweep() {
        let lim = Limiter::memory(MemoryConfig {
            max_keys: 100,
            sweep_interval: Duration::from_secs(3600),
        });
        let spec = rate("t", 2, Duration::from_millis(300));
        for i in 0..100 {
            assert!(lim.check(&spec, &kv(i), 1).await.is_allowed());
        }
        assert_eq!(lim.key_count(), 100);
        // 50 new keys while full of live keys: they share one bucket of 2.
        let mut allowed = 0;
        for i in 100..150 {
            allowed += usize::from(lim.check(&spec, &kv(i), 1).await.is_allowed());
        }
        assert_eq!(
            allowed, 2,
            "overflowed keys must share one bucket, never pass freely"
        );
        assert_eq!(lim.overflowed(), 50);
        assert_eq!(lim.key_count(), 100);
        // Once the old keys are idle, a new key evicts them inline and gets its own bucket.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(lim.check(&spec, &kv(1000), 1).await.is_allowed());
        assert!(lim.check(&spec, &kv(1000), 1).await.is_allowed());
        assert!(!lim.check(&spec, &kv(1000), 1).await.is_allowed());
        assert_eq!(lim.key_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_entries_vanish_when_released() {
        let lim = Limiter::memory(MemoryConfig::default());
        let spec = LimitSpec {
            id: Arc::from("c"),
            kind: LimitKind::Concurrent { max: 1 },
            by: vec![],
        };
        let p = lim.acquire(&spec, &kv(1)).await.unwrap();
        assert_eq!(lim.key_count(), 1);
        assert!(lim.acquire(&spec, &kv(2)).await.is_err());
        drop(p);
        assert_eq!(lim.key_count(), 0);
        let _p = lim.acquire(&spec, &kv(2)).await.unwrap();
    }
}
