//! Prometheus registry and the handles the request path updates.
//!
//! Labels are bounded by the policy (vendor ids, endpoint classes, actions, rule ids, error
//! kinds): never a client address, a user, a key or a path. Those live in the audit log.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
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

        Metrics {
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
            connections_active: gauge("portcullis_connections_active", "Client connections open now."),
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
        }
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
