//! The proxy: accept connections, serve one request at a time through one handler, open and
//! splice CONNECT tunnels.

pub mod activity;
pub mod body;
pub mod budget;
pub mod client_socket;
pub mod connect;
pub mod handler;
pub mod head_wait;
pub mod hop_by_hop;
pub mod inspect;
pub mod intercept;
pub mod limit;
pub mod metered;
pub mod on_wake;
pub mod overrides;
pub mod per_client;
pub mod pressure;
pub mod records;
pub mod respond;
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod stall;
pub mod tunnel_upstream;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;

use crate::audit::{AuditSink, Record};
use crate::config::Settings;
use crate::identity::htpasswd::Htpasswd;
use crate::identity::keys::KeyFingerprinter;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::upstream::connector::Connector;
use crate::upstream::Upstream;
use body::Counted;

/// Proxy users, when `[auth]` is configured.
pub struct Auth {
    /// Read again on every reload, so removing a user revokes them without a restart.
    pub htpasswd: ArcSwap<Htpasswd>,
    pub realm: String,
    pub required: bool,
}

/// State shared by every connection. The policy is swapped whole on reload; everything else
/// lives as long as the process.
pub struct State {
    pub policy: ArcSwap<Policy>,
    /// Bumped after each policy swap: open opaque tunnels decide again on the new policy.
    pub policy_swapped: tokio::sync::watch::Sender<u64>,
    pub settings: Settings,
    pub upstream: Arc<Upstream>,
    /// `https` origins (HTTP/1.1 or HTTP/2, as ALPN decides) for absolute-form requests;
    /// an intercepted tunnel has its own ([`intercept::Inside::upstream`]).
    pub client: HttpsClient,
    /// Requests in flight inside each client address's intercepted tunnels, capped like its
    /// connections: an HTTP/2 tunnel multiplexes hundreds of streams, and to an HTTP/1.1
    /// origin each is an upstream connection (a file descriptor) of its own.
    pub inner_streams: Arc<per_client::ClientCap>,
    /// Plain-`http` origins.
    pub h1: Arc<crate::upstream::pool::Pool<Counted<body::RequestBody>>>,
    /// Plain-HTTP exchanges of requests without a body.
    pub direct: Arc<crate::upstream::direct::DirectPool>,
    /// The interception CA, when `[intercept]` is configured.
    /// Built from `[intercept]`'s CA at start and again at a reload that adds the section or
    /// changes its CA: the vendors a reload lists are intercepted from then on.
    pub interceptor: arc_swap::ArcSwapOption<intercept::Interceptor>,
    pub audit: AuditSink,
    pub metrics: Arc<Metrics>,
    pub auth: Option<Auth>,
    pub keys: KeyFingerprinter,
    pub ready: AtomicBool,
    pub shutdown: shutdown::Shutdown,
    /// The main config file for reloads; `None` = the embedded default.
    pub source: Option<std::path::PathBuf>,
    /// Bearer token for the admin listener's /reload and /policy, when configured.
    pub admin_token: Option<String>,
    /// The proxy listener's bound address.
    pub listen_addr: SocketAddr,
    pub bulk: Option<crate::signals::bulk::BulkDetector>,
    pub limiter: Arc<crate::limits::Limiter>,
}

/// A pooled client for `https` origins.
pub type HttpsClient = Client<Connector, Counted<body::RequestBody>>;

/// A client for `https` origins with its own pool, over the shared connector (address guard,
/// resolver overrides, upstream TLS settings).
pub fn https_client(
    upstream: Arc<Upstream>,
    settings: &crate::config::UpstreamSettings,
    max_idle: usize,
) -> HttpsClient {
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host.min(max_idle))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .timer(hyper_util::rt::TokioTimer::new())
        // The same ceiling as an HTTP/1 answer's head (h2's default is 16 KiB): counted per
        // field as its name and value plus 32 (RFC 9113 §6.5.2), and it bounds trailers too,
        // which h2 otherwise drops without a word when they are larger.
        .http2_max_header_list_size((crate::upstream::direct::MAX_HEAD_BYTES + 32 * 100) as u32)
        .build(Connector::new(upstream))
}

impl State {
    pub fn shutdown_signal(&self) -> shutdown::Signal {
        self.shutdown.signal()
    }

    /// Accounts one finished exchange: metrics, then the audit queue (never blocks).
    pub fn finish(&self, rec: Box<Record>, start: Instant) {
        self.account(rec, start, true);
    }

    /// An intercepted tunnel's own record. The bytes it holds are its requests', and each
    /// request has counted its own in the metrics and bulk signals already (the tunnel is not
    /// a request of its own there either).
    pub fn finish_intercepted(&self, rec: Box<Record>, start: Instant) {
        self.account(rec, start, false);
    }

    /// `own`: the record is an exchange of its own, not an intercepted tunnel's summary of
    /// the requests already accounted one by one (its bytes and its bulk count are theirs).
    fn account(&self, mut rec: Box<Record>, start: Instant, own: bool) {
        let (bytes_out, bytes_in) = match own {
            true => (rec.bytes_out, rec.bytes_in),
            false => (0, 0),
        };
        let elapsed = start.elapsed();
        rec.duration_ms = elapsed.as_secs_f64() * 1000.0;
        // Shadow decisions get their own action label so dashboards of real blocks stay true.
        let action = match (rec.mode, rec.action) {
            ("shadow", "block") => "shadow_block",
            ("shadow", "audit") => "shadow_audit",
            ("shadow", "limit") => "shadow_limit",
            ("shadow", _) => "shadow_allow",
            (_, a) => a,
        };
        self.metrics.exchange(
            &crate::metrics::Exchange {
                vendor: rec.vendor.as_ref(),
                endpoint: rec.endpoint,
                action,
                rule: rec.rule.as_ref(),
            },
            elapsed.as_secs_f64(),
            bytes_out,
            bytes_in,
        );
        if let (Some(bulk), Some(vendor), true) = (&self.bulk, rec.vendor.clone(), own) {
            if reached_the_vendor(&rec) {
                self.observe_bulk(bulk, &rec, &vendor, bytes_in);
            }
        }
        self.audit.send(rec);
    }

    /// Feeds the bulk-extraction detector; a crossed threshold becomes its own audit record.
    fn observe_bulk(
        &self,
        bulk: &crate::signals::bulk::BulkDetector,
        rec: &Record,
        vendor: &Arc<str>,
        bytes_in: u64,
    ) {
        let (v4, v6);
        let principal = match (rec.user.as_deref(), rec.client.ip()) {
            (Some(u), _) => u,
            // On the stack: this runs for every request to a vendor.
            (None, std::net::IpAddr::V4(ip)) => {
                v4 = crate::policy::target::Dotted::new(ip);
                v4.as_str()
            }
            (None, ip) => {
                v6 = ip.to_string();
                &v6
            }
        };
        let seen = crate::signals::bulk::Observation {
            principal,
            vendor,
            endpoint: rec.endpoint,
            key_ids: match (rec.key_ids.as_slice(), rec.key_id.as_ref()) {
                ([], Some(one)) => std::slice::from_ref(one),
                (each, _) => each,
            },
            bytes_in,
            now: Instant::now(),
        };
        if let Some(s) = bulk.observe(&seen) {
            self.metrics
                .bulk_suspected
                .with_label_values(&[vendor])
                .inc();
            let mut alert = rec.clone();
            alert.id = self.audit.next_id();
            alert.ts = std::time::SystemTime::now();
            alert.action = "audit";
            alert.mode = "enforce";
            alert.rule = None;
            // A signal, not another exchange: the request's own record has its bytes.
            (alert.bytes_in, alert.bytes_out, alert.duration_ms) = (0, 0, 0.0);
            alert.reason = format!(
                "bulk_extraction_suspected: {} over {}s: requests={} bytes={} distinct_keys={} bulk_requests={}",
                s.tripped.join(","),
                s.window_secs,
                s.requests,
                s.bytes,
                s.distinct_keys,
                s.bulk_requests
            )
            .into();
            self.audit.send(Box::new(alert));
        }
    }
}

/// Whether an exchange went to its vendor, and so counts toward bulk signals: what the proxy
/// refused itself (a block, a `reject` such as a 407, a limit's 429) pulled nothing, and a
/// scanner could otherwise raise the bulk alert at will. A tunnel a reload closed (`block`)
/// had relayed its bytes first.
fn reached_the_vendor(rec: &Record) -> bool {
    let let_through = match (rec.mode, rec.action) {
        ("shadow", _) => true,
        (_, "block" | "reject") => false,
        (_, "limit") => !matches!(rec.status, 429 | 503),
        _ => true,
    };
    let_through || rec.bytes_in > 0
}

/// Who is on the other end of a client connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
}

impl Peer {
    /// A dual-stack listener (`[::]`) reports IPv4 clients as `::ffff:a.b.c.d`; rules,
    /// limits and the log name them by their IPv4 address, so that is what a peer holds.
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr: SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Peer;

    #[test]
    fn ipv4_mapped_peers_are_named_by_their_ipv4_address() {
        let mapped: std::net::SocketAddr = "[::ffff:10.20.1.1]:4000".parse().unwrap();
        assert_eq!(Peer::new(mapped).addr.to_string(), "10.20.1.1:4000");
        let v6: std::net::SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        assert_eq!(Peer::new(v6).addr, v6);
    }
}
