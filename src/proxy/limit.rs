//! Admission under a rule's limits, and the byte meter that charges bodies and tunnels as
//! they flow. Requests are reserved BEFORE forwarding: a limit that charged only on completion
//! would let concurrent requests slip past it.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::limits::{KeyPart, KeyValues, LimitKind, LimitSpec, Limiter, Permit, Verdict};
use crate::policy::Rule;

/// Bytes are charged in chunks: per frame would be a store round trip per frame.
const CHARGE_EVERY: u64 = 16 * 1024;

/// The limit that refused a request.
#[derive(Debug, Clone)]
pub struct Refused {
    pub limit: Arc<str>,
    pub retry_after: u64,
    /// The limit store could not answer (`on_store_error = "deny"`): a 503, not a 429.
    pub store_unavailable: bool,
}

fn refused(spec: &LimitSpec, v: Verdict) -> Refused {
    Refused {
        limit: spec.id.clone(),
        retry_after: v.retry_after_secs().unwrap_or(1),
        store_unavailable: v == Verdict::Unavailable,
    }
}

/// Checks the rule's limits in the order that wastes nothing: a spent byte budget first, then
/// in-flight slots (held by the returned permits), then the request rate.
pub async fn admit(
    limiter: &Limiter,
    rule: &Rule,
    kv: &KeyValues<'_>,
    keyed_only: bool,
) -> Result<Vec<Permit>, Refused> {
    // `keyed_only`: a request's further keys, charged only where the key picks the bucket.
    let specs = || {
        rule.limits
            .iter()
            .filter(move |s| !keyed_only || s.by.contains(&KeyPart::Key))
    };
    for spec in specs().filter(|s| matches!(s.kind, LimitKind::Bytes { .. })) {
        let v = limiter.check(spec, kv, 0).await;
        if !v.is_allowed() {
            return Err(refused(spec, v));
        }
    }
    let mut permits = Vec::new();
    for spec in specs().filter(|s| matches!(s.kind, LimitKind::Concurrent { .. })) {
        match limiter.acquire(spec, kv).await {
            Ok(p) => permits.push(p),
            Err(v) => return Err(refused(spec, v)),
        }
    }
    for spec in specs().filter(|s| matches!(s.kind, LimitKind::Rate { .. })) {
        let v = limiter.check(spec, kv, 1).await;
        if !v.is_allowed() {
            return Err(refused(spec, v));
        }
    }
    Ok(permits)
}

/// The key values, owned, for charges made after the request handler has returned.
#[derive(Clone)]
struct OwnedKeys {
    client: IpAddr,
    user: Option<String>,
    key_id: Option<String>,
    vendor: Option<String>,
}

impl OwnedKeys {
    fn view(&self) -> KeyValues<'_> {
        KeyValues {
            client: self.client,
            user: self.user.as_deref(),
            key_id: self.key_id.as_deref(),
            vendor: self.vendor.as_deref(),
        }
    }
}

/// Charges streamed bytes against a rule's byte limits; `over()` turns true once one is
/// overdrawn, and the body or tunnel is then cut.
pub struct ByteMeter {
    limiter: Arc<Limiter>,
    specs: Arc<[Arc<LimitSpec>]>,
    /// The request's keys; after the first, one per further API key, charged only by specs
    /// whose bucket the key picks.
    keys: Arc<[OwnedKeys]>,
    pending: u64,
    over: Arc<AtomicBool>,
    tripped: Arc<Mutex<Option<Arc<str>>>>,
}

impl ByteMeter {
    /// `None` when the rule has no byte limit.
    pub fn for_rule(
        limiter: &Arc<Limiter>,
        rule: &Rule,
        kv: &KeyValues<'_>,
        more_keys: &[String],
    ) -> Option<ByteMeter> {
        let specs: Arc<[Arc<LimitSpec>]> = rule
            .limits
            .iter()
            .filter(|s| matches!(s.kind, LimitKind::Bytes { .. }))
            .cloned()
            .collect();
        if specs.is_empty() {
            return None;
        }
        Some(ByteMeter {
            limiter: limiter.clone(),
            specs,
            keys: std::iter::once(kv.key_id)
                .chain(more_keys.iter().map(|k| Some(k.as_str())))
                .map(|key_id| OwnedKeys {
                    client: kv.client,
                    user: kv.user.map(Into::into),
                    key_id: key_id.map(Into::into),
                    vendor: kv.vendor.map(Into::into),
                })
                .collect(),
            pending: 0,
            over: Arc::new(AtomicBool::new(false)),
            tripped: Arc::new(Mutex::new(None)),
        })
    }

    pub fn add(&mut self, n: u64) {
        self.pending += n;
        if self.pending >= CHARGE_EVERY {
            self.flush();
        }
    }

    /// Charges what has flowed since the last charge. The in-memory store answers at once, so
    /// the charge completes here and the body stops within one charge of the limit; a remote
    /// store's charge finishes in a task, so the body never waits on the network.
    pub fn flush(&mut self) {
        let n = std::mem::take(&mut self.pending);
        if n == 0 {
            return;
        }
        let (limiter, specs, keys) = (self.limiter.clone(), self.specs.clone(), self.keys.clone());
        let (over, tripped) = (self.over.clone(), self.tripped.clone());
        let mut charge = Box::pin(async move {
            for (i, keys) in keys.iter().enumerate() {
                for spec in specs.iter() {
                    if i > 0 && !spec.by.contains(&KeyPart::Key) {
                        continue;
                    }
                    if limiter
                        .charge_bytes(spec, &keys.view(), n)
                        .await
                        .is_allowed()
                    {
                        continue;
                    }
                    if let Ok(mut t) = tripped.lock() {
                        t.get_or_insert_with(|| spec.id.clone());
                    }
                    over.store(true, Ordering::Release);
                }
            }
        });
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if charge.as_mut().poll(&mut cx).is_pending() {
            // Polled again, with a real waker, by the task.
            tokio::spawn(charge);
        }
    }

    pub fn over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// The limit that was overdrawn.
    pub fn tripped(&self) -> Option<Arc<str>> {
        self.tripped.lock().ok().and_then(|t| t.clone())
    }
}
