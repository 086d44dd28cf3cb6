//! Bulk-extraction signals: who is pulling unusual volumes through a vendor API.
//!
//! Per (principal, vendor) the detector keeps sliding-window figures: requests, response bytes,
//! requests to bulk endpoint classes (`batches`, `files`) and distinct API-key fingerprints.
//! When a principal crosses a configured threshold, [`BulkDetector::observe`] returns one
//! [`Suspicion`]; the caller turns it into an audit record and bumps a counter labelled by vendor
//! only. Principals never leave this module except in suspicions and the admin [`top`] list,
//! because a principal as a metric label would make the label set unbounded.
//!
//! Memory is bounded twice: each entry is a fixed ring of [`BUCKETS`] sub-buckets plus a key set
//! capped just above the key threshold, and the number of entries is capped by
//! [`BulkConfig::max_principals`], evicting the least recently seen when full.
//!
//! Time comes only from the `now` the caller passes, so tests drive the clock without sleeping.
//!
//! [`top`]: BulkDetector::top

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use rustc_hash::FxBuildHasher;
use serde::Serialize;

/// Sub-buckets per window. Twelve keeps an entry small (192 bytes of counters) while the window
/// edge is off by at most a twelfth of the window.
pub const BUCKETS: usize = 12;

/// Key fingerprints remembered per entry when no key threshold is set, so the admin list still
/// shows a small key count without letting one principal's key set grow.
const DEFAULT_KEY_SLOTS: usize = 8;

/// Endpoint classes (as the catalog names them) whose use counts as bulk: they move whole
/// datasets in one request, so a handful of them matters more than many chat calls.
const BULK_ENDPOINTS: [&str; 2] = ["batches", "files"];

// Bits of the tripped mask, in the order `Suspicion::tripped` lists them.
const TRIP_REQUESTS: u8 = 1;
const TRIP_BYTES: u8 = 2;
const TRIP_KEYS: u8 = 4;
const TRIP_BULK: u8 = 8;
const TRIP_NAMES: [(u8, &str); 4] = [
    (TRIP_REQUESTS, "requests"),
    (TRIP_BYTES, "bytes"),
    (TRIP_KEYS, "distinct_keys"),
    (TRIP_BULK, "bulk_requests"),
];

#[derive(Debug, Clone)]
pub struct BulkConfig {
    /// Length of the sliding window, split into [`BUCKETS`] sub-buckets.
    pub window: Duration,
    /// Thresholds: a figure strictly above its maximum trips it; `None` is not checked.
    pub max_requests: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Key sprawl: more distinct key fingerprints than this behind one principal.
    pub max_distinct_keys: Option<u32>,
    /// Requests to `batches` / `files` endpoints.
    pub max_bulk_requests: Option<u64>,
    /// Cap on tracked (principal, vendor) entries; the least recently seen go first when full.
    pub max_principals: usize,
    /// Length of each vendor's list from [`BulkDetector::top`].
    pub top_n: usize,
}

/// One finished request, as the request path saw it.
pub struct Observation<'a> {
    /// User name when known, else the client address as a string.
    pub principal: &'a str,
    pub vendor: &'a str,
    /// Endpoint class as the catalog names it (`chat`, `batches`, `files`, ...).
    pub endpoint: &'a str,
    /// API-key fingerprints seen (e.g. `k_0123456789ab`), each of a request that carried
    /// several; never the keys themselves.
    pub key_ids: &'a [Box<str>],
    /// Response bytes, vendor to client.
    pub bytes_in: u64,
    pub now: Instant,
}

/// A principal crossed at least one threshold. Figures are over the window ending at the
/// request that tripped it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Suspicion {
    pub principal: String,
    pub vendor: String,
    pub requests: u64,
    pub bytes: u64,
    /// Exact up to `max_distinct_keys + 1` (8 when unset), where counting stops.
    pub distinct_keys: u32,
    pub bulk_requests: u64,
    pub window_secs: u64,
    /// Which thresholds tripped: any of `requests`, `bytes`, `distinct_keys`, `bulk_requests`.
    pub tripped: Vec<&'static str>,
}

/// One row of the admin list.
#[derive(Debug, Clone, Serialize)]
pub struct TopEntry {
    pub principal: String,
    pub requests: u64,
    pub bytes: u64,
    pub distinct_keys: u32,
    pub bulk_requests: u64,
}

/// Tracks bulk-extraction figures for every (principal, vendor). `Send + Sync`: share one behind
/// an `Arc` across all connections.
pub struct BulkDetector {
    cfg: BulkConfig,
    /// FxHash rather than SipHash because the lookup runs on every request; principals are
    /// authenticated users or connecting addresses, not strings a client picks at will.
    map: DashMap<EntryKey, Tally, FxBuildHasher>,
    /// Entries reserved or present; kept beside the map so the cap check does not lock every
    /// shard the way `DashMap::len` does.
    count: AtomicUsize,
    /// Only one eviction sweep at a time; others skip rather than block a request task.
    sweeping: AtomicBool,
    /// New principals not tracked because the map was full and a sweep was already running.
    dropped: AtomicU64,
    /// Instants are opaque, so times are measured from the first `now` ever observed.
    origin: OnceLock<Instant>,
    bucket_nanos: u64,
    key_slots: usize,
    /// Keyed (SipHash with a random key) because key fingerprints come from clients: a client
    /// must not be able to craft fingerprints that collide and hide key sprawl.
    key_hasher: RandomState,
}

impl BulkDetector {
    pub fn new(cfg: BulkConfig) -> BulkDetector {
        let window_nanos = u64::try_from(cfg.window.as_nanos()).unwrap_or(u64::MAX);
        // A zero window would divide by zero; one-nanosecond buckets just mean "no memory".
        let bucket_nanos = (window_nanos / BUCKETS as u64).max(1);
        let key_slots = match cfg.max_distinct_keys {
            // One slot above the threshold is all it takes to see it crossed.
            Some(max) => usize::try_from(max).unwrap_or(usize::MAX).saturating_add(1),
            None => DEFAULT_KEY_SLOTS,
        };
        BulkDetector {
            cfg: BulkConfig {
                // A cap of zero would make every observation a failed insert; track at least one.
                max_principals: cfg.max_principals.max(1),
                ..cfg
            },
            map: DashMap::with_hasher(FxBuildHasher),
            count: AtomicUsize::new(0),
            sweeping: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            origin: OnceLock::new(),
            bucket_nanos,
            key_slots,
            key_hasher: RandomState::new(),
        }
    }

    /// Records one finished request and returns a suspicion when this request made the
    /// principal cross a threshold. Once fired, the entry stays quiet until its figures fall back
    /// under every threshold or a full window has passed since it fired.
    ///
    /// Cost: one dashmap shard write lock; no allocation when the entry exists, except to
    /// remember a new distinct key.
    pub fn observe(&self, o: &Observation<'_>) -> Option<Suspicion> {
        let nanos = self.nanos(o.now);
        let hit = Hit {
            nanos,
            bytes: o.bytes_in,
            bulk: BULK_ENDPOINTS.contains(&o.endpoint),
            keys: o.key_ids,
        };
        let probe: (&str, &str) = (o.principal, o.vendor);
        let fired = if let Some(mut tally) = self.map.get_mut(&probe as &dyn PairKey) {
            self.record(&mut tally, &hit)
        } else {
            if !self.reserve_slot(nanos) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.map.entry(EntryKey {
                principal: o.principal.into(),
                vendor: o.vendor.into(),
            }) {
                // Another task inserted it between our lookup and now: give the slot back.
                MapEntry::Occupied(mut occupied) => {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    self.record(occupied.get_mut(), &hit)
                }
                MapEntry::Vacant(vacant) => {
                    let mut tally = Tally::new(nanos);
                    let fired = self.record(&mut tally, &hit);
                    vacant.insert(tally);
                    fired
                }
            }
        };
        // Strings are built only here, once per episode, outside the shard lock.
        fired.map(|(f, mask)| Suspicion {
            principal: o.principal.to_owned(),
            vendor: o.vendor.to_owned(),
            requests: f.requests,
            bytes: f.bytes,
            distinct_keys: f.keys,
            bulk_requests: f.bulk,
            window_secs: self.cfg.window.as_secs(),
            tripped: TRIP_NAMES
                .iter()
                .filter(|(bit, _)| mask & bit != 0)
                .map(|&(_, name)| name)
                .collect(),
        })
    }

    /// Heaviest principals per vendor by requests in the window (ties by bytes, then by name so
    /// the list is stable), at most `top_n` each. Principals idle for the whole window are left
    /// out. Walks the whole map: meant for the admin endpoint, not the request path.
    pub fn top(&self, vendor: Option<&str>, now: Instant) -> BTreeMap<String, Vec<TopEntry>> {
        let mut out: BTreeMap<String, Vec<TopEntry>> = BTreeMap::new();
        let top_n = self.cfg.top_n;
        if top_n == 0 {
            return out;
        }
        let tick = self.nanos(now) / self.bucket_nanos;
        for item in self.map.iter() {
            let key = item.key();
            if vendor.is_some_and(|v| v != &*key.vendor) {
                continue;
            }
            let f = item.value().figures(tick, self.bucket_nanos);
            if f.requests == 0 {
                continue;
            }
            // Each list is kept sorted and bounded while walking, so the admin path never holds
            // more than top_n rows per vendor however many principals there are.
            let list = match out.get_mut(&*key.vendor) {
                Some(list) => list,
                None => out.entry(key.vendor.to_string()).or_default(),
            };
            let pos = list.partition_point(|e| ranks_before(e, &f, &key.principal));
            if pos >= top_n {
                continue;
            }
            if list.len() == top_n {
                list.pop();
            }
            list.insert(
                pos,
                TopEntry {
                    principal: key.principal.to_string(),
                    requests: f.requests,
                    bytes: f.bytes,
                    distinct_keys: f.keys,
                    bulk_requests: f.bulk,
                },
            );
        }
        out.retain(|_, list| !list.is_empty());
        out
    }

    /// Number of (principal, vendor) entries held.
    pub fn tracked(&self) -> usize {
        self.map.len()
    }

    /// New principals that went untracked because the map was full while another task was
    /// already evicting. Non-zero only under a flood of new principals.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn nanos(&self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Updates one entry; returns the figures and tripped mask when this request opens a new
    /// episode.
    fn record(&self, t: &mut Tally, hit: &Hit<'_>) -> Option<(Figures, u8)> {
        // Requests finish out of order across tasks; a slightly older `now` counts as the
        // entry's latest time so the ring never moves backwards.
        let nanos = hit.nanos.max(t.last_seen);
        let tick = nanos / self.bucket_nanos;
        t.advance(tick, self.bucket_nanos);
        t.last_seen = nanos;
        let slot = &mut t.buckets[bucket_index(tick)];
        slot.requests = slot.requests.saturating_add(1);
        slot.bytes = slot.bytes.saturating_add(hit.bytes);
        if hit.bulk {
            slot.bulk = slot.bulk.saturating_add(1);
        }
        for key in hit.keys {
            t.touch_key(self.key_hasher.hash_one(&**key), tick, self.key_slots);
        }
        let f = t.figures(tick, self.bucket_nanos);
        let mask = self.tripped(&f);
        if let Some(fired) = t.fired_tick {
            // Re-arm once the figures are back under, or after a cool-down of one window so a
            // sustained abuser is reported once per window rather than once ever.
            if mask == 0 || tick >= fired.saturating_add(BUCKETS as u64) {
                t.fired_tick = None;
            }
        }
        if t.fired_tick.is_none() && mask != 0 {
            t.fired_tick = Some(tick);
            return Some((f, mask));
        }
        None
    }

    fn tripped(&self, f: &Figures) -> u8 {
        let over = |max: Option<u64>, v: u64| max.is_some_and(|m| v > m);
        let mut mask = 0;
        if over(self.cfg.max_requests, f.requests) {
            mask |= TRIP_REQUESTS;
        }
        if over(self.cfg.max_bytes, f.bytes) {
            mask |= TRIP_BYTES;
        }
        if over(self.cfg.max_distinct_keys.map(u64::from), u64::from(f.keys)) {
            mask |= TRIP_KEYS;
        }
        if over(self.cfg.max_bulk_requests, f.bulk) {
            mask |= TRIP_BULK;
        }
        mask
    }

    /// Claims room for one new entry, sweeping when full. False when the map is full and
    /// another task is already sweeping: the caller skips this observation rather than let the
    /// map grow past its cap or wait on a request task.
    fn reserve_slot(&self, now_nanos: u64) -> bool {
        let max = self.cfg.max_principals;
        let mut swept = false;
        loop {
            let current = self.count.load(Ordering::Relaxed);
            if current < max {
                if self
                    .count
                    .compare_exchange_weak(
                        current,
                        current + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if swept || !self.sweep(now_nanos) {
                return false;
            }
            swept = true;
        }
    }

    /// Evicts everything idle for a whole window, and the least recently seen entries until the
    /// map is an eighth below its cap, so one O(entries) sweep pays for many inserts.
    fn sweep(&self, now_nanos: u64) -> bool {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return false;
        }
        let max = self.cfg.max_principals;
        let target = max.saturating_sub((max / 8).max(1));
        let mut seen: Vec<u64> = self.map.iter().map(|e| e.value().last_seen).collect();
        let excess = seen.len().saturating_sub(target);
        let window_nanos = self.bucket_nanos.saturating_mul(BUCKETS as u64);
        let idle_before = now_nanos.saturating_sub(window_nanos);
        // The `excess`-th oldest time: entries older go, and just enough entries seen at exactly
        // that time go to make up the number (ties are common when a flood arrives at once).
        let (cutoff, mut at_cutoff) = if excess > 0 {
            let (below, nth, _) = seen.select_nth_unstable(excess - 1);
            let nth = *nth;
            let strictly_below = below.iter().filter(|&&v| v < nth).count();
            (Some(nth), excess - strictly_below)
        } else {
            (None, 0)
        };
        drop(seen);
        let mut removed = 0usize;
        self.map.retain(|_, t| {
            let evict = t.last_seen < idle_before
                || match cutoff {
                    Some(c) if t.last_seen < c => true,
                    Some(c) if t.last_seen == c && at_cutoff > 0 => {
                        at_cutoff -= 1;
                        true
                    }
                    _ => false,
                };
            if evict {
                removed += 1;
            }
            !evict
        });
        self.count.fetch_sub(removed, Ordering::Relaxed);
        self.sweeping.store(false, Ordering::Release);
        removed > 0
    }
}

/// Whether `e` sorts before a candidate with figures `f` and name `principal`.
fn ranks_before(e: &TopEntry, f: &Figures, principal: &str) -> bool {
    (e.requests, e.bytes) > (f.requests, f.bytes)
        || ((e.requests, e.bytes) == (f.requests, f.bytes) && *e.principal <= *principal)
}

fn bucket_index(tick: u64) -> usize {
    (tick % BUCKETS as u64) as usize
}

/// What one request adds, computed before taking the shard lock.
struct Hit<'a> {
    nanos: u64,
    bytes: u64,
    bulk: bool,
    keys: &'a [Box<str>],
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Figures {
    requests: u64,
    bytes: u64,
    keys: u32,
    bulk: u64,
}

/// Counts for one sub-bucket. u32 request counts: four billion requests in a twelfth of a
/// window is far beyond any link, and saturating adds cover the rest.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    requests: u32,
    bulk: u32,
    bytes: u64,
}

/// One (principal, vendor)'s window. The ring holds ticks `head - BUCKETS + 1 ..= head`, where
/// `head` is the tick of `last_seen`, so no per-bucket timestamp is needed.
#[derive(Debug)]
struct Tally {
    buckets: [Bucket; BUCKETS],
    /// Nanoseconds since the detector's origin of the latest request; also the LRU clock.
    last_seen: u64,
    /// Tick at which the current episode fired; `None` while armed.
    fired_tick: Option<u64>,
    /// (fingerprint hash, last tick seen), at most `key_slots` long.
    keys: Vec<(u64, u64)>,
}

impl Tally {
    fn new(nanos: u64) -> Tally {
        Tally {
            buckets: [Bucket::default(); BUCKETS],
            last_seen: nanos,
            fired_tick: None,
            keys: Vec::new(),
        }
    }

    /// Moves the ring forward to `tick`, clearing the buckets that roll off.
    fn advance(&mut self, tick: u64, bucket_nanos: u64) {
        let head = self.last_seen / bucket_nanos;
        let gap = tick.saturating_sub(head);
        if gap >= BUCKETS as u64 {
            self.buckets = [Bucket::default(); BUCKETS];
        } else {
            for t in head + 1..=tick {
                self.buckets[bucket_index(t)] = Bucket::default();
            }
        }
    }

    /// Sums over the window ending at `tick` without modifying the ring, so the admin path can
    /// read under a shared lock.
    fn figures(&self, tick: u64, bucket_nanos: u64) -> Figures {
        let head = self.last_seen / bucket_nanos;
        let elapsed = tick.saturating_sub(head);
        let mut f = Figures::default();
        if elapsed >= BUCKETS as u64 {
            return f;
        }
        // Buckets head, head-1, ... that still lie inside the window ending at `tick`.
        let live = BUCKETS as u64 - elapsed;
        for back in 0..live.min(head + 1) {
            let b = &self.buckets[bucket_index(head - back)];
            f.requests += u64::from(b.requests);
            f.bytes = f.bytes.saturating_add(b.bytes);
            f.bulk += u64::from(b.bulk);
        }
        let oldest_live = tick.saturating_sub(BUCKETS as u64 - 1);
        let keys = self.keys.iter().filter(|&&(_, seen)| seen >= oldest_live);
        f.keys = u32::try_from(keys.count()).unwrap_or(u32::MAX);
        f
    }

    /// Remembers a key fingerprint. When the set is full the least recently seen slot is
    /// reused; expired ones are the oldest, so live keys are dropped only beyond the threshold,
    /// where the exact number no longer matters.
    fn touch_key(&mut self, key: u64, tick: u64, slots: usize) {
        if let Some(slot) = self.keys.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = tick;
        } else if self.keys.len() < slots {
            self.keys.push((key, tick));
        } else if let Some(oldest) = self.keys.iter_mut().min_by_key(|(_, seen)| *seen) {
            *oldest = (key, tick);
        }
    }
}

/// The map key. Lookups borrow it as `dyn PairKey` so a `(&str, &str)` probe finds an entry
/// without allocating the owned strings.
#[derive(Debug)]
struct EntryKey {
    principal: Box<str>,
    vendor: Box<str>,
}

trait PairKey {
    fn pair(&self) -> (&str, &str);
}

impl PairKey for EntryKey {
    fn pair(&self) -> (&str, &str) {
        (&self.principal, &self.vendor)
    }
}

impl PairKey for (&str, &str) {
    fn pair(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn PairKey + 'a> for EntryKey {
    fn borrow(&self) -> &(dyn PairKey + 'a) {
        self
    }
}

// Hash and Eq of the key and of the borrowed form must agree, so both go through `pair()`.
impl Hash for EntryKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pair().hash(state);
    }
}

impl PartialEq for EntryKey {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}

impl Eq for EntryKey {}

impl Hash for dyn PairKey + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pair().hash(state);
    }
}

impl PartialEq for dyn PairKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}

impl Eq for dyn PairKey + '_ {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const HOUR: Duration = Duration::from_secs(3600);

    fn cfg() -> BulkConfig {
        BulkConfig {
            window: HOUR,
            max_requests: None,
            max_bytes: None,
            max_distinct_keys: None,
            max_bulk_requests: None,
            max_principals: 100_000,
            top_n: 20,
        }
    }

    fn obs<'a>(principal: &'a str, vendor: &'a str, now: Instant) -> Observation<'a> {
        Observation {
            principal,
            vendor,
            endpoint: "chat",
            key_ids: &[],
            bytes_in: 100,
            now,
        }
    }

    #[test]
    fn requests_threshold_fires_once_per_episode() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(50),
            ..cfg()
        });
        let t0 = Instant::now();
        for i in 0..50 {
            let now = t0 + Duration::from_secs(i);
            assert_eq!(d.observe(&obs("alice", "openai", now)), None, "request {i}");
        }
        let s = d
            .observe(&obs("alice", "openai", t0 + Duration::from_secs(50)))
            .expect("51st request crosses 50");
        assert_eq!(
            s,
            Suspicion {
                principal: "alice".into(),
                vendor: "openai".into(),
                requests: 51,
                bytes: 5100,
                distinct_keys: 0,
                bulk_requests: 0,
                window_secs: 3600,
                tripped: vec!["requests"],
            }
        );
        for i in 51..200 {
            let now = t0 + Duration::from_secs(i);
            assert_eq!(d.observe(&obs("alice", "openai", now)), None, "request {i}");
        }
        // A window later everything has rolled off: the first request re-arms, the 51st fires.
        let t1 = t0 + HOUR + Duration::from_secs(400);
        for i in 0..50 {
            let now = t1 + Duration::from_secs(i);
            assert_eq!(d.observe(&obs("alice", "openai", now)), None, "request {i}");
        }
        let again = d.observe(&obs("alice", "openai", t1 + Duration::from_secs(50)));
        assert_eq!(
            again.map(|s| (s.requests, s.tripped)),
            Some((51, vec!["requests"]))
        );
    }

    #[test]
    fn sustained_abuse_is_reported_again_after_a_window() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(10),
            ..cfg()
        });
        let t0 = Instant::now();
        let mut fired = 0;
        // 60 requests a minute for three hours: always over, so only the cool-down re-arms.
        for i in 0..3 * 3600 {
            if d.observe(&obs("bob", "openai", t0 + Duration::from_secs(i)))
                .is_some()
            {
                fired += 1;
            }
        }
        assert_eq!(fired, 3);
    }

    #[test]
    fn serializes_for_the_audit_record() {
        let s = Suspicion {
            principal: "10.0.0.7".into(),
            vendor: "anthropic".into(),
            requests: 1,
            bytes: 2,
            distinct_keys: 3,
            bulk_requests: 4,
            window_secs: 3600,
            tripped: vec!["distinct_keys"],
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["tripped"], serde_json::json!(["distinct_keys"]));
        assert_eq!(v["principal"], "10.0.0.7");
    }

    #[test]
    fn key_sprawl() {
        let d = BulkDetector::new(BulkConfig {
            max_distinct_keys: Some(5),
            ..cfg()
        });
        let t0 = Instant::now();
        // The same key over and over is one key.
        for i in 0..1000 {
            let o = Observation {
                key_ids: &["k_000000000000".into()],
                ..obs("carol", "openai", t0 + Duration::from_millis(i))
            };
            assert_eq!(d.observe(&o), None);
        }
        let keys: Vec<String> = (1..=6).map(|i| format!("k_{i:012x}")).collect();
        let mut fired = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let o = Observation {
                key_ids: &[k.as_str().into()],
                ..obs("dave", "openai", t0 + Duration::from_secs(i as u64))
            };
            fired.push(d.observe(&o));
        }
        assert!(fired[..5].iter().all(Option::is_none));
        let s = fired[5].clone().expect("sixth distinct key trips 5");
        assert_eq!((s.distinct_keys, s.tripped), (6, vec!["distinct_keys"]));
        // Many more keys: the set stays at threshold + 1 and the episode stays quiet.
        for i in 0..100 {
            let k = format!("k_x{i:011x}");
            let o = Observation {
                key_ids: &[k.as_str().into()],
                ..obs("dave", "openai", t0 + Duration::from_secs(10))
            };
            assert_eq!(d.observe(&o), None);
        }
        let top = d.top(Some("openai"), t0 + Duration::from_secs(10));
        let dave = top["openai"]
            .iter()
            .find(|e| e.principal == "dave")
            .unwrap();
        assert_eq!(dave.distinct_keys, 6);
    }

    #[test]
    fn keys_expire_with_the_window() {
        let d = BulkDetector::new(BulkConfig {
            max_distinct_keys: Some(5),
            ..cfg()
        });
        let t0 = Instant::now();
        // Five keys an hour, rotated hourly: never six in one window.
        for hour in 0..5u64 {
            for k in 0..5u64 {
                let key = format!("k_{hour}_{k}");
                let now = t0 + HOUR * hour as u32 + Duration::from_secs(60 * k);
                let o = Observation {
                    key_ids: &[key.as_str().into()],
                    ..obs("erin", "openai", now)
                };
                assert_eq!(d.observe(&o), None, "hour {hour} key {k}");
            }
        }
    }

    #[test]
    fn bytes_threshold() {
        let d = BulkDetector::new(BulkConfig {
            max_bytes: Some(1_000_000),
            ..cfg()
        });
        let t0 = Instant::now();
        let big = |n: u64| Observation {
            bytes_in: 300_000,
            ..obs("frank", "openai", t0 + Duration::from_secs(n))
        };
        for n in 0..3 {
            assert_eq!(d.observe(&big(n)), None);
        }
        let s = d.observe(&big(3)).expect("1.2 MB crosses 1 MB");
        assert_eq!(
            (s.bytes, s.requests, s.tripped),
            (1_200_000, 4, vec!["bytes"])
        );
        assert_eq!(d.observe(&big(4)), None);
    }

    #[test]
    fn bulk_endpoint_threshold() {
        let d = BulkDetector::new(BulkConfig {
            max_bulk_requests: Some(3),
            max_requests: Some(1000),
            ..cfg()
        });
        let t0 = Instant::now();
        let at = |endpoint, n: u64| Observation {
            endpoint,
            ..obs("gina", "openai", t0 + Duration::from_secs(n))
        };
        // Chat and embeddings are not bulk however many there are.
        for n in 0..100 {
            assert_eq!(d.observe(&at("chat", n)), None);
            assert_eq!(d.observe(&at("embeddings", n)), None);
        }
        assert_eq!(d.observe(&at("batches", 200)), None);
        assert_eq!(d.observe(&at("files", 201)), None);
        assert_eq!(d.observe(&at("batches", 202)), None);
        let s = d
            .observe(&at("files", 203))
            .expect("4 bulk requests cross 3");
        assert_eq!((s.bulk_requests, s.requests), (4, 204));
        assert_eq!(s.tripped, vec!["bulk_requests"]);
    }

    #[test]
    fn several_thresholds_at_once_are_all_named() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(0),
            max_bytes: Some(0),
            max_bulk_requests: Some(0),
            max_distinct_keys: Some(0),
            ..cfg()
        });
        let o = Observation {
            endpoint: "batches",
            key_ids: &["k_1".into()],
            ..obs("hank", "openai", Instant::now())
        };
        let s = d.observe(&o).unwrap();
        assert_eq!(
            s.tripped,
            vec!["requests", "bytes", "distinct_keys", "bulk_requests"]
        );
    }

    #[test]
    fn evenly_spread_traffic_never_trips_the_sliding_window() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(50),
            ..cfg()
        });
        let t0 = Instant::now();
        // 60 requests over two windows: 30 in any window.
        for i in 0..60u32 {
            let now = t0 + HOUR * 2 / 60 * i;
            assert_eq!(d.observe(&obs("ivan", "openai", now)), None, "request {i}");
        }
        // Read at the last request (1h58m): the window then holds the 30 sent since 1h00m.
        let now = t0 + HOUR * 2 / 60 * 59;
        assert_eq!(d.top(None, now)["openai"][0].requests, 30);
    }

    #[test]
    fn window_slides_rather_than_resets() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(50),
            ..cfg()
        });
        let t0 = Instant::now();
        // 40 near the end of one hour, 20 just after it: a fixed hourly reset would miss this.
        for i in 0..40u64 {
            assert_eq!(
                d.observe(&obs("judy", "openai", t0 + Duration::from_secs(3000 + i))),
                None
            );
        }
        let mut fired = None;
        for i in 0..20u64 {
            let now = t0 + HOUR + Duration::from_secs(i);
            fired = fired.or(d.observe(&obs("judy", "openai", now)));
        }
        assert_eq!(fired.map(|s| s.requests), Some(51));
    }

    #[test]
    fn figures_read_at_a_later_now_roll_off() {
        let d = BulkDetector::new(cfg());
        let t0 = Instant::now();
        for i in 0..10u64 {
            d.observe(&obs("kim", "openai", t0 + Duration::from_secs(i * 60)));
        }
        assert_eq!(
            d.top(None, t0 + Duration::from_secs(600))["openai"][0].requests,
            10
        );
        assert!(d.top(None, t0 + HOUR * 2).is_empty());
    }

    #[test]
    fn principals_and_vendors_are_separate() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(5),
            ..cfg()
        });
        let now = Instant::now();
        for (p, v) in [("a", "openai"), ("a", "anthropic"), ("b", "openai")] {
            for _ in 0..5 {
                assert_eq!(d.observe(&obs(p, v, now)), None, "{p} {v}");
            }
        }
        let s = d.observe(&obs("a", "anthropic", now)).unwrap();
        assert_eq!(
            (s.principal.as_str(), s.vendor.as_str(), s.requests),
            ("a", "anthropic", 6)
        );
        assert_eq!(d.tracked(), 3);
        // A principal whose name looks like a concatenation of others stays separate too.
        assert_eq!(d.observe(&obs("aopenai", "", now)), None);
        assert_eq!(d.tracked(), 4);
    }

    #[test]
    fn top_orders_and_bounds() {
        let d = BulkDetector::new(BulkConfig { top_n: 3, ..cfg() });
        let now = Instant::now();
        let load = [
            ("p1", 5, 10),
            ("p2", 9, 1),
            ("p3", 5, 20),
            ("p4", 1, 1),
            ("p5", 7, 0),
        ];
        for (p, n, bytes) in load {
            for _ in 0..n {
                d.observe(&Observation {
                    bytes_in: bytes,
                    ..obs(p, "openai", now)
                });
            }
        }
        for _ in 0..2 {
            d.observe(&obs("q1", "anthropic", now));
        }
        let top = d.top(None, now);
        let names =
            |v: &str| -> Vec<String> { top[v].iter().map(|e| e.principal.clone()).collect() };
        assert_eq!(names("openai"), ["p2", "p5", "p3"]);
        assert_eq!(names("anthropic"), ["q1"]);
        assert_eq!(top["openai"][2].bytes, 100);
        let only = d.top(Some("anthropic"), now);
        assert_eq!(only.keys().collect::<Vec<_>>(), ["anthropic"]);
        assert!(d.top(Some("mistral"), now).is_empty());
        let none = BulkDetector::new(BulkConfig { top_n: 0, ..cfg() });
        none.observe(&obs("x", "openai", now));
        assert!(none.top(None, now).is_empty());
    }

    #[test]
    fn max_principals_holds_under_a_flood() {
        let d = BulkDetector::new(BulkConfig {
            max_principals: 1000,
            ..cfg()
        });
        let t0 = Instant::now();
        // The heavy principal keeps being seen, so it is never the least recent.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            let name = format!("10.0.{}.{}", i / 256, i % 256);
            d.observe(&obs(&name, "openai", now));
            d.observe(&obs("heavy", "openai", now));
            assert!(d.tracked() <= 1000, "tracked {} at {i}", d.tracked());
        }
        assert_eq!(d.dropped(), 0);
        let top = d.top(Some("openai"), t0 + Duration::from_secs(10));
        assert_eq!(top["openai"][0].principal, "heavy");
        assert_eq!(top["openai"][0].requests, 10_000);
    }

    #[test]
    fn max_principals_holds_with_simultaneous_arrivals() {
        let d = BulkDetector::new(BulkConfig {
            max_principals: 100,
            ..cfg()
        });
        let now = Instant::now();
        for i in 0..1000 {
            d.observe(&obs(&format!("p{i}"), "openai", now));
            assert!(d.tracked() <= 100);
        }
        assert!(d.tracked() >= 80);
    }

    #[test]
    fn out_of_order_now_does_not_rewind() {
        let d = BulkDetector::new(cfg());
        let t0 = Instant::now();
        d.observe(&obs("lee", "openai", t0 + HOUR));
        d.observe(&obs("lee", "openai", t0));
        assert_eq!(d.top(None, t0 + HOUR)["openai"][0].requests, 2);
    }

    #[test]
    fn concurrent_observes_add_up() {
        let d = Arc::new(BulkDetector::new(BulkConfig {
            max_requests: Some(1_000_000),
            ..cfg()
        }));
        let t0 = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let d = Arc::clone(&d);
                std::thread::spawn(move || {
                    let own = format!("user{t}");
                    for i in 0..10_000u64 {
                        let now = t0 + Duration::from_micros(i);
                        let key = format!("k_{}", i % 3);
                        let shared = Observation {
                            key_ids: &[key.as_str().into()],
                            endpoint: if i % 10 == 0 { "batches" } else { "chat" },
                            ..obs("shared", "openai", now)
                        };
                        assert_eq!(d.observe(&shared), None);
                        assert_eq!(d.observe(&obs(&own, "openai", now)), None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let top = d.top(Some("openai"), t0 + Duration::from_secs(1));
        let list = &top["openai"];
        assert_eq!(list[0].principal, "shared");
        assert_eq!(list[0].requests, 80_000);
        assert_eq!(list[0].bytes, 8_000_000);
        assert_eq!(list[0].bulk_requests, 8_000);
        assert_eq!(list[0].distinct_keys, 3);
        assert_eq!(list.len(), 9);
        assert!(list[1..].iter().all(|e| e.requests == 10_000));
        assert_eq!(d.tracked(), 9);
    }

    #[test]
    fn detector_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<BulkDetector>();
    }

    /// Not an assertion: prints the cost of `observe` (run with `--release --nocapture`).
    #[test]
    fn observe_cost() {
        let d = BulkDetector::new(BulkConfig {
            max_requests: Some(u64::MAX),
            max_distinct_keys: Some(5),
            ..cfg()
        });
        let names: Vec<String> = (0..10_000)
            .map(|i| format!("10.1.{}.{}", i / 256, i % 256))
            .collect();
        let t0 = Instant::now();
        for n in &names {
            d.observe(&obs(n, "openai", t0));
        }
        let n = 1_000_000u64;
        let start = Instant::now();
        for i in 0..n {
            let o = Observation {
                key_ids: &["k_0123456789ab".into()],
                ..obs(
                    &names[(i as usize * 7919) % names.len()],
                    "openai",
                    t0 + Duration::from_micros(i),
                )
            };
            std::hint::black_box(d.observe(&o));
        }
        let per = start.elapsed().as_nanos() / u128::from(n);
        println!("observe, existing entry of 10k: {per} ns/op");
        let start = Instant::now();
        let fresh = BulkDetector::new(BulkConfig {
            max_principals: 5_000,
            ..cfg()
        });
        for (i, name) in names.iter().enumerate() {
            fresh.observe(&obs(name, "openai", t0 + Duration::from_micros(i as u64)));
        }
        let per = start.elapsed().as_nanos() / names.len() as u128;
        println!("observe, new entry with eviction at 5k: {per} ns/op");
    }
}
