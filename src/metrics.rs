//! Prometheus registry and the handles the request path updates.
//!
//! Labels are bounded by the policy (vendor ids, endpoint classes, actions, rule ids, error
//! kinds): never a client address, a user, a key or a path. Those live in the audit log.
//!
//! Counters that alerts watch with `increase()` exist at 0 before their first event: a series
//! whose first sample is already 1 has no increase to Prometheus, so the first reload failure
//! or bulk-extraction signal would never alert. The fixed label sets (reload results, upstream
//! error kinds) are made here; those that come from the policy (vendors, limit rules) by
//! [`Metrics::seed_policy`], at start and after every reload.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use rustc_hash::FxHashMap;

use crate::policy::{Action, Policy};

/// Every `kind` of `portcullis_upstream_errors_total`: [`crate::error::ProxyError::kind`] of
/// each error for which `is_upstream()` holds (a unit test keeps the two in step).
pub const UPSTREAM_ERROR_KINDS: &[&str] = &[
    "dns",
    "address_denied",
    "connect",
    "connect_timeout",
    "tls",
    "timeout",
    "upstream",
    "response_head_too_large",
    "upstream_body",
    "body_timeout",
];

/// Every `result` of `portcullis_config_reloads_total`.
pub const RELOAD_RESULTS: &[&str] = &["ok", "error"];

/// The labels of one finished exchange, as the audit record holds them.
pub struct Exchange<'a> {
    pub vendor: Option<&'a Arc<str>>,
    pub endpoint: &'static str,
    pub action: &'static str,
    pub rule: Option<&'a Arc<str>>,
}

/// The series one label combination updates, resolved once per thread. `with_label_values`
/// hashes every label string and takes the vector's read lock; an exchange would pay that up
/// to four times.
struct Handles {
    requests: IntCounter,
    duration: Histogram,
    bytes_out: Option<IntCounter>,
    bytes_in: Option<IntCounter>,
    // Held so the addresses in the key cannot be reused by other strings while cached.
    _vendor: Option<Arc<str>>,
    _rule: Option<Arc<str>>,
}

/// Keyed by identity, not content: the registry instance, then the vendor and rule strings
/// (shared `Arc`s from the policy) and the static endpoint and action names.
type HandleKey = (
    u64,
    Option<*const str>,
    *const str,
    *const str,
    Option<*const str>,
);

/// Bounded by the policy's vendors × endpoints × actions × rules; cleared whole when reloads
/// have left too many stale entries behind.
const HANDLE_CACHE_MAX: usize = 4096;

thread_local! {
    static HANDLES: RefCell<FxHashMap<HandleKey, Handles>> = RefCell::default();
}

static NEXT_REGISTRY: AtomicU64 = AtomicU64::new(0);

/// One of a gauge's open things (a tunnel, a connection): counted while this is held.
pub struct Active(IntGauge);

impl Active {
    pub fn count(gauge: &IntGauge) -> Active {
        gauge.inc();
        Active(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Metrics {
    registry: Registry,
    /// Distinguishes registries in the per-thread handle cache (tests run several).
    instance: u64,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub tunnels_active: IntGauge,
    pub bytes: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub audit_records: IntCounter,
    pub audit_dropped: IntCounter,
    pub config_reloads: IntCounterVec,
    pub bulk_suspected: IntCounterVec,
    pub limit_store_errors: IntCounter,
    pub connections_active: IntGauge,
    pub connections_refused: IntCounter,
    pub connections_refused_per_client: IntCounter,
    pub audit_refused: IntCounter,
    pub build_info: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let requests = counter_vec(
            "portcullis_requests_total",
            "Decisions made, by vendor, endpoint class, action and rule.",
            &["vendor", "endpoint", "action", "rule"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_request_duration_seconds",
                "Time from request head to the end of the response (tunnels: whole tunnel life).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0,
            ]),
            &["vendor", "action"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new("portcullis_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let m = Metrics {
            requests,
            duration,
            tunnels_active: gauge("portcullis_tunnels_active", "CONNECT tunnels open now."),
            bytes: counter_vec(
                "portcullis_bytes_total",
                "Body and tunnel bytes by vendor; direction out = client to vendor, in = vendor to client.",
                &["vendor", "direction"],
            ),
            rate_limited: counter_vec(
                "portcullis_rate_limited_total",
                "Requests refused by a limit.",
                &["vendor", "rule"],
            ),
            upstream_errors: counter_vec(
                "portcullis_upstream_errors_total",
                "Failures reaching or talking to the origin, by kind.",
                &["kind"],
            ),
            audit_records: counter("portcullis_audit_records_total", "Audit records written."),
            audit_dropped: counter(
                "portcullis_audit_dropped_total",
                "Audit records dropped because the writer queue was full.",
            ),
            config_reloads: counter_vec(
                "portcullis_config_reloads_total",
                "Policy reloads by result.",
                &["result"],
            ),
            bulk_suspected: counter_vec(
                "portcullis_bulk_suspected_total",
                "Principals that crossed a bulk-extraction threshold (who: see the audit log).",
                &["vendor"],
            ),
            limit_store_errors: counter(
                "portcullis_limit_store_errors_total",
                "Limit checks the store (Redis) could not answer; on_store_error applied.",
            ),
            connections_active: gauge(
                "portcullis_connections_active",
                "Client connections open now, other than CONNECT tunnels (portcullis_tunnels_active): the two add up to the client sockets held.",
            ),
            connections_refused: counter(
                "portcullis_connections_refused_total",
                "Client connections closed at accept because max_connections was reached.",
            ),
            connections_refused_per_client: counter(
                "portcullis_connections_refused_per_client_total",
                "Client connections closed at accept because their address held max_connections_per_client.",
            ),
            audit_refused: counter(
                "portcullis_audit_refused_total",
                "Requests and CONNECTs answered 503 because the audit log could not take records (on_full = block).",
            ),
            build_info,
            registry,
            instance: NEXT_REGISTRY.fetch_add(1, Ordering::Relaxed),
        };
        // The fixed label sets, at 0 from the first scrape on.
        for kind in UPSTREAM_ERROR_KINDS {
            m.upstream_errors.with_label_values(&[kind]);
        }
        for result in RELOAD_RESULTS {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    /// Creates, at 0, the series whose labels come from `policy`, so that the first event of
    /// each is an increase Prometheus can see: `portcullis_bulk_suspected_total{vendor}` for
    /// every catalog vendor (when `bulk` detection is on) and
    /// `portcullis_rate_limited_total{vendor,rule}` for every `limit` rule, with the vendors it
    /// names (a rule that names none can meet any vendor, or `none`). Series of an older
    /// policy stay; calling it again for the same policy changes nothing.
    pub fn seed_policy(&self, policy: &Policy, bulk: bool) {
        let vendors = policy.catalog.vendors();
        if bulk {
            for v in vendors {
                self.bulk_suspected.with_label_values(&[&v.id]);
            }
        }
        for rule in policy.rules.iter().filter(|r| r.action == Action::Limit) {
            if rule.vendors.is_empty() {
                for v in vendors.iter().map(|v| &*v.id).chain(["none"]) {
                    self.rate_limited.with_label_values(&[v, &rule.id]);
                }
            } else {
                for &v in &rule.vendors {
                    let id = &policy.catalog.vendor(v).id;
                    self.rate_limited.with_label_values(&[id, &rule.id]);
                }
            }
        }
    }

    /// Counts one finished exchange: requests, duration and the bytes each way.
    pub fn exchange(&self, x: &Exchange<'_>, seconds: f64, bytes_out: u64, bytes_in: u64) {
        let key: HandleKey = (
            self.instance,
            x.vendor.map(Arc::as_ptr),
            x.endpoint,
            x.action,
            x.rule.map(Arc::as_ptr),
        );
        let vendor = x.vendor.map_or("none", |v| &**v);
        HANDLES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if !cache.contains_key(&key) && cache.len() >= HANDLE_CACHE_MAX {
                cache.clear();
            }
            let h = cache.entry(key).or_insert_with(|| Handles {
                requests: self.requests.with_label_values(&[
                    vendor,
                    x.endpoint,
                    x.action,
                    x.rule.map_or("default", |r| &**r),
                ]),
                duration: self.duration.with_label_values(&[vendor, x.action]),
                bytes_out: None,
                bytes_in: None,
                _vendor: x.vendor.cloned(),
                _rule: x.rule.cloned(),
            });
            h.requests.inc();
            h.duration.observe(seconds);
            // Byte series appear on first use, as they did when looked up per exchange.
            if bytes_out > 0 {
                h.bytes_out
                    .get_or_insert_with(|| self.bytes.with_label_values(&[vendor, "out"]))
                    .inc_by(bytes_out);
            }
            if bytes_in > 0 {
                h.bytes_in
                    .get_or_insert_with(|| self.bytes.with_label_values(&[vendor, "in"]))
                    .inc_by(bytes_in);
            }
        });
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        // Encoding into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&families, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn cached_handles_count_under_the_right_labels_per_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let vendor: Arc<str> = "openai".into();
        let rule: Arc<str> = "cap-openai".into();
        let x = Exchange {
            vendor: Some(&vendor),
            endpoint: "chat",
            action: "allow",
            rule: Some(&rule),
        };
        a.exchange(&x, 0.001, 0, 10);
        a.exchange(&x, 0.001, 5, 10);
        let none = Exchange {
            vendor: None,
            endpoint: "none",
            action: "allow",
            rule: None,
        };
        b.exchange(&none, 0.001, 0, 0);

        let ta = text(&a);
        assert!(ta.contains(
            r#"portcullis_requests_total{action="allow",endpoint="chat",rule="cap-openai",vendor="openai"} 2"#
        ));
        assert!(ta.contains(r#"portcullis_bytes_total{direction="in",vendor="openai"} 20"#));
        assert!(ta.contains(r#"portcullis_bytes_total{direction="out",vendor="openai"} 5"#));
        assert!(!ta.contains(r#"vendor="none""#));
        // The second registry shares the thread's cache but none of the first one's series.
        let tb = text(&b);
        assert!(tb.contains(
            r#"portcullis_requests_total{action="allow",endpoint="none",rule="default",vendor="none"} 1"#
        ));
        assert!(!tb.contains("openai"));
        assert!(!tb.contains("portcullis_bytes_total{"));
    }

    #[test]
    fn equal_strings_from_different_policies_share_a_series() {
        let m = Metrics::new();
        for _ in 0..3 {
            // A reload builds new `Arc`s with the same text: new cache keys, same series.
            let vendor: Arc<str> = "deepseek".into();
            let x = Exchange {
                vendor: Some(&vendor),
                endpoint: "other",
                action: "block",
                rule: None,
            };
            m.exchange(&x, 0.0, 0, 0);
        }
        assert!(text(&m).contains(
            r#"portcullis_requests_total{action="block",endpoint="other",rule="default",vendor="deepseek"} 3"#
        ));
    }

    /// The exposed samples of `name` as (labels, value) lines, e.g. `{kind="dns"} 0`.
    fn series(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter(|l| l.starts_with('{'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_fresh_registry_exposes_reload_results_and_upstream_error_kinds_at_zero() {
        let t = text(&Metrics::new());
        let reloads = series(&t, "portcullis_config_reloads_total");
        assert_eq!(
            reloads,
            [r#"{result="error"} 0"#, r#"{result="ok"} 0"#],
            "{t}"
        );
        let kinds = series(&t, "portcullis_upstream_errors_total");
        assert_eq!(kinds.len(), UPSTREAM_ERROR_KINDS.len(), "{t}");
        for k in UPSTREAM_ERROR_KINDS {
            assert!(kinds.contains(&format!("{{kind=\"{k}\"}} 0")), "{k}: {t}");
        }
    }

    #[test]
    fn upstream_error_kinds_are_every_kind_the_request_path_counts() {
        use crate::error::ProxyError;
        let every = [
            ProxyError::Dns("x".into()),
            ProxyError::NoAddress,
            ProxyError::AddressDenied(crate::upstream::guard::GuardDenied {
                addr: "127.0.0.1:80".parse().unwrap(),
                class: crate::upstream::guard::AddrClass::Loopback,
            }),
            ProxyError::Connect(std::io::ErrorKind::ConnectionRefused.into()),
            ProxyError::ConnectTimeout,
            ProxyError::Tls("x".into()),
            ProxyError::ResponseTimeout,
            ProxyError::Upstream("x".into()),
            ProxyError::ResponseHeadTooLarge,
            ProxyError::UpstreamBodyTimeout,
            ProxyError::UpstreamBody("x".into()),
            ProxyError::NotProxyRequest,
            ProxyError::AuthRequired,
            ProxyError::PortNotAllowed(25),
            ProxyError::DuplicateHost,
            ProxyError::UnsupportedTransferCoding("gzip".into()),
            ProxyError::ClientBody("x".into()),
            ProxyError::ClientHelloTimeout,
            ProxyError::Misdirected("x".into()),
            ProxyError::ClientBodyTimeout,
            ProxyError::InspectionTimeout,
            ProxyError::AuditUnavailable,
            ProxyError::InspectionBusy,
            ProxyError::ClientAborted,
        ];
        let mut counted: Vec<&str> = every
            .iter()
            .filter(|e| e.is_upstream())
            .map(ProxyError::kind)
            .collect();
        counted.sort_unstable();
        counted.dedup();
        let mut listed = UPSTREAM_ERROR_KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(counted, listed);
    }

    #[test]
    fn seed_policy_creates_bulk_and_limit_series_at_zero_and_keeps_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
        std::fs::write(
            &path,
            format!(
                "include = [\"{vendors}\"]\n\
                 [[rule]]\nid = \"cap-openai\"\nvendor = \"openai\"\naction = \"limit\"\n\
                 limit = {{ requests = 5, per = \"1m\", by = \"client\" }}\n\
                 [[rule]]\nid = \"cap-example\"\nhost = \"*.example.ai\"\naction = \"limit\"\n\
                 limit = {{ concurrent = 2, by = \"client\" }}\n"
            ),
        )
        .unwrap();
        let policy = crate::config::load(&path).unwrap().policy;
        let n_vendors = policy.catalog.vendors().len();

        let m = Metrics::new();
        m.seed_policy(&policy, false);
        let t = text(&m);
        assert!(
            series(&t, "portcullis_bulk_suspected_total").is_empty(),
            "{t}"
        );
        let limited = series(&t, "portcullis_rate_limited_total");
        assert!(
            limited.contains(&r#"{rule="cap-openai",vendor="openai"} 0"#.to_string()),
            "{t}"
        );
        assert!(
            limited.contains(&r#"{rule="cap-example",vendor="none"} 0"#.to_string()),
            "{t}"
        );
        assert_eq!(limited.len(), 1 + n_vendors + 1, "{t}");

        m.rate_limited
            .with_label_values(&["openai", "cap-openai"])
            .inc();
        m.seed_policy(&policy, true);
        let t = text(&m);
        let bulk = series(&t, "portcullis_bulk_suspected_total");
        assert_eq!(bulk.len(), n_vendors, "{t}");
        assert!(
            bulk.contains(&r#"{vendor="deepseek"} 0"#.to_string()),
            "{t}"
        );
        assert!(
            t.contains(r#"portcullis_rate_limited_total{rule="cap-openai",vendor="openai"} 1"#),
            "seeding again keeps what was counted: {t}"
        );
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                !line.contains("127.0.0.1") && !line.contains('/'),
                "no address or path in a label: {line}"
            );
        }
    }
}
