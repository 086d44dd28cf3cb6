//! WebSocket through the proxy (RFC 6455): `ws://` in absolute form on the plain listener, and
//! `wss://` inside an intercepted tunnel (an opaque CONNECT tunnel carries it untouched).
//!
//! Why a path of its own: `Upgrade` and `Connection` are hop-by-hop, so the usual path strips
//! them and the origin sees a plain GET; and the `https` pool may carry the request over HTTP/2,
//! where no upgrade exists. So a handshake, once the policy has let it through exactly as any
//! request (decision, limits, keys, tenant checks), goes upstream on a connection of its own,
//! HTTP/1.1 only, through the same address guard, resolve overrides and certificate checks,
//! with the upgrade asked for again. On the origin's `101` the client is answered `101` and the
//! two upgraded connections are spliced as a tunnel is, under the same idle timeout and
//! shutdown; the exchange's one audit record is written when the WebSocket closes, with the
//! bytes relayed each way. Any other answer goes back as an ordinary response. Only
//! `websocket` is relayed: other upgrades (`h2c`) stay stripped.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;

use super::body::{OriginBody, ProxyBody, UpstreamHold};
use super::handler::{still_authorised, tenant_refusal};
use super::hop_by_hop::{append_via, strip_hop_by_hop};
use super::limit::ByteMeter;
use super::metered::{settle, Metered, Stats};
use super::on_wake::OnWake;
use super::per_client::ClientSlot;
use super::State;
use crate::audit::Record;
use crate::error::ProxyError;
use crate::identity::ProxyUser;
use crate::limits::Permit;
use crate::metrics::Active;
use crate::policy::{Action, Host, Scheme, Target};
use crate::upstream::connector::{server_name, MaybeTls};

/// How long a WebSocket one side has closed waits for the other while nothing moves: the close
/// handshake is one frame each way, then the server closes.
const HALF_CLOSED_IDLE: Duration = Duration::from_secs(5);

/// A request that asks to switch to WebSocket, holding the client's side of the upgrade.
pub struct Websocket {
    client: OnUpgrade,
}

/// Marks an origin's `101` to a WebSocket handshake, carrying the client's side of it.
#[derive(Clone)]
struct Switched(OnUpgrade);

impl Websocket {
    /// `Some` for an HTTP/1.1 `GET` with `Upgrade: websocket` and `Connection: upgrade` (RFC
    /// 6455 §4.1; tokens in any case, among others) and no body. A `ws://` or `wss://` target
    /// becomes the `http://` or `https://` it stands for (RFC 6455 §3), so it is decided,
    /// recorded and forwarded as that.
    pub fn asked(req: &mut Request<Incoming>) -> Option<Websocket> {
        // hyper gives only HTTP/1.1 requests naming `Upgrade` (and CONNECTs) an upgrade to
        // take: looking for it first keeps the header lookups off every other request.
        if req.method() != Method::GET || req.extensions().get::<OnUpgrade>().is_none() {
            return None;
        }
        let h = req.headers();
        if req.version() != Version::HTTP_11
            || !has_token(h, &header::UPGRADE, "websocket")
            || !has_token(h, &header::CONNECTION, "upgrade")
            || !http_body::Body::is_end_stream(req.body())
        {
            return None;
        }
        let client = req.extensions_mut().remove::<OnUpgrade>()?;
        let scheme = match req.uri().scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("ws") => Some(http::uri::Scheme::HTTP),
            Some(s) if s.eq_ignore_ascii_case("wss") => Some(http::uri::Scheme::HTTPS),
            _ => None,
        };
        if let Some(scheme) = scheme {
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = Some(scheme);
            // Only the scheme changed, so this cannot fail; if it did, the empty URI left
            // is refused as not a proxy request.
            *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
        }
        Some(Websocket { client })
    }

    /// Sends the handshake (the client's request after hop-by-hop stripping, Host set) to
    /// `target` on a new HTTP/1.1 connection, asking for the upgrade again. The answer is
    /// handed back as the pools' are; a `101` is marked for [`relay`].
    pub async fn handshake(
        self,
        state: &State,
        target: &Target,
        mut parts: Parts,
        uri: &Uri,
        timeout: Duration,
    ) -> Result<(Response<OriginBody>, Option<UpstreamHold>), ProxyError> {
        parts.uri = match uri.path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
        parts.version = Version::HTTP_11;
        // Nothing of the client connection's (its upgrade, its busy mark) goes to the origin's.
        parts.extensions = http::Extensions::new();
        upgrading(&mut parts.headers);
        let req = Request::from_parts(parts, Empty::<Bytes>::new());

        let upstream = &state.upstream;
        let (tcp, _) = upstream.connect(&target.host, target.port).await?;
        let exchange = async {
            let io = match target.scheme {
                Scheme::Http => MaybeTls::Plain(tcp),
                Scheme::Https => {
                    let tls = TlsConnector::from(upstream.tls_h1.clone())
                        .connect(server_name(&target.host)?, tcp)
                        .await
                        .map_err(|e| ProxyError::Tls(e.to_string()))?;
                    MaybeTls::Tls(Box::new(tls))
                }
            };
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| crate::upstream::hyper_error(&e))?;
            // Ends once it hands the connection over (101), or once the answer's body has
            // been read and `tx` is gone.
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            tx.send_request(req)
                .await
                .map_err(|e| crate::upstream::hyper_error(&e))
        };
        let mut resp = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ProxyError::ResponseTimeout)??;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if !has_token(resp.headers(), &header::UPGRADE, "websocket") {
                return Err(ProxyError::Upstream(
                    "the origin switched to another protocol than the websocket asked for".into(),
                ));
            }
            resp.extensions_mut().insert(Switched(self.client));
        }
        Ok((resp.map(Either::Left), None))
    }
}

/// Whether `resp` is an origin's `101` to a WebSocket handshake (see [`relay`]).
pub fn switched(resp: &Response<OriginBody>) -> bool {
    resp.extensions().get::<Switched>().is_some()
}

/// What an exchange holds until its WebSocket closes.
pub struct Open {
    pub state: Arc<State>,
    pub rec: Box<Record>,
    pub start: Instant,
    /// In-flight slots of `concurrent` limits: an open WebSocket holds them as a tunnel does.
    pub permits: Vec<Permit>,
    /// Byte limits, charged both ways as a tunnel's are.
    pub meter: Option<ByteMeter>,
    /// Inside an intercepted tunnel, the client's slot for requests in flight.
    pub stream_slot: Option<ClientSlot>,
    /// What a reload decides the open WebSocket on again.
    pub recheck: Box<Recheck>,
}

/// The handshake as the policy saw it. A reload decides an open WebSocket on it again, as it
/// does an opaque tunnel: a Realtime session must not outlive a block rolled out meanwhile,
/// nor the proxy user who opened it.
pub struct Recheck {
    pub client: IpAddr,
    pub login: Option<ProxyUser>,
    pub host: Host,
    pub port: u16,
    pub path: Box<str>,
    pub asked: Asked,
    /// Inside an intercepted tunnel: its port, which must stay in `connect_ports`.
    pub tunnel_port: Option<u16>,
    /// Taken before the policy that decided the handshake was read: a reload while the origin
    /// is still answering is seen too.
    pub swaps: tokio::sync::watch::Receiver<u64>,
}

/// What else the handshake asked for, beside its request line.
#[derive(Default)]
pub struct Asked {
    /// The other methods and paths its override fields and parameters named.
    pub readings: Box<[super::overrides::OwnedReading]>,
    /// Its account fields (`OpenAI-Organization`, `OpenAI-Project`), for `require_orgs`.
    pub orgs: Box<[Box<str>]>,
    /// The key it was made with, for `require_keys`.
    pub key_id: Option<Box<str>>,
    /// The model it was decided on (its query string's: a handshake has no body).
    pub model: Option<Box<str>>,
}

impl Recheck {
    /// `Some((reason, rule))` when the policy and users as they are now refuse the handshake.
    fn refused(&self, state: &State) -> Option<(String, Option<Arc<str>>)> {
        if let Some(u) = self.login.as_ref().filter(|u| !still_authorised(state, u)) {
            tracing::debug!(
                user = u.name(),
                "websocket's proxy user no longer in the user file"
            );
            return Some(("proxy_user_revoked".into(), None));
        }
        let policy = state.policy.load();
        if let Some(port) = self
            .tunnel_port
            .filter(|p| !policy.connect_ports.contains(p))
        {
            tracing::debug!(port, "websocket's tunnel port left connect_ports");
            return Some(("port_not_allowed".into(), None));
        }
        let asked = crate::policy::Request {
            client: self.client,
            user: self.login.as_ref().map(ProxyUser::name),
            method: &Method::GET,
            host: &self.host,
            port: self.port,
            path: Some(&self.path),
            body: crate::policy::BodyFacts {
                model: self.asked.model.as_deref(),
                dlp: 0,
            },
        };
        let mut d = policy.decide(&asked);
        for (method, path) in &self.asked.readings {
            d = d.merge(policy.decide(&crate::policy::Request {
                method: method.as_ref().unwrap_or(&Method::GET),
                path: path.as_deref().or(asked.path),
                ..asked
            }));
        }
        if d.enforced() == Action::Block {
            return Some((d.reason.to_string(), d.rule_id().cloned()));
        }
        let orgs = || self.asked.orgs.iter().map(|o| &**o);
        let why = d
            .restricting_rules()
            .find_map(|rule| tenant_refusal(rule, self.asked.key_id.as_deref(), orgs()))?;
        Some((why, d.rule_id().cloned()))
    }
}

/// Answers the client `101` with the origin's fields (hop-by-hop ones stripped, the upgrade's
/// restored) and relays the two upgraded connections in a task of their own, which writes the
/// exchange's record when the WebSocket closes.
pub fn relay(mut resp: Response<OriginBody>, mut open: Open) -> Response<ProxyBody> {
    // Unmarked (not a `switched` answer), the client's side is an upgrade that never comes,
    // and the relay ends at once as `upgrade_failed`.
    let client = match resp.extensions_mut().remove::<Switched>() {
        Some(Switched(c)) => c,
        None => hyper::upgrade::on(Response::new(())),
    };
    let origin = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // What follows a 101 is the new protocol's, not a body of this length.
    parts.headers.remove(header::CONTENT_LENGTH);
    upgrading(&mut parts.headers);
    append_via(&mut parts.headers);
    open.rec.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
    // Taken now: shutdown waits for this record even before the task first runs.
    let token = open.state.shutdown.token();
    tokio::spawn(open.run(token, client, origin));
    let mut answer = Response::new(Either::Left(Full::default()));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = parts.headers;
    answer
}

impl Open {
    async fn run(mut self, _token: super::shutdown::Token, client: OnUpgrade, origin: OnUpgrade) {
        let state = self.state.clone();
        let mut shutdown = state.shutdown_signal();
        let mut swaps = self.recheck.swaps.clone();
        let idle = state.settings.proxy.idle_timeout;
        // The client's connection (or its tunnel) stays open as this WebSocket: counted as it
        // was before the switch, which ended hyper's hold on it.
        let _open = Active::count(match self.rec.tls {
            "intercept" => &state.metrics.tunnels_active,
            _ => &state.metrics.connections_active,
        });
        let stats = Stats::new(Instant::now());
        let mut meter = self.meter.take();
        let reason = {
            let relayed = async {
                // The client's side is ready once hyper has written our 101.
                let (client, origin) =
                    tokio::try_join!(client, origin).map_err(|e| format!("upgrade_failed: {e}"))?;
                let mut client = TokioIo::new(client);
                let mut origin = Metered::new(TokioIo::new(origin), &stats, meter.as_mut());
                let half_closed = idle.min(HALF_CLOSED_IDLE);
                super::splice::splice(&mut client, &mut origin, 16 * 1024, half_closed)
                    .await
                    .map(drop)
                    .map_err(|e| format!("websocket_error: {e}"))
            };
            // Polled only when they woke the task, not on each of the copy's wake-ups.
            let recheck = &self.recheck;
            let watchers = OnWake::new(async {
                loop {
                    tokio::select! {
                        _ = stats.activity.idle(idle) => break ("idle_timeout".to_string(), None),
                        _ = shutdown.stopping() => break ("shutdown".to_string(), None),
                        Ok(()) = swaps.changed() => {
                            if let Some((why, rule)) = recheck.refused(&state) {
                                break (format!("policy_reloaded: {why}"), Some(rule));
                            }
                        }
                    }
                }
            });
            tokio::select! {
                r = relayed => r.err(),
                (why, blocked) = watchers => {
                    if let Some(rule) = blocked {
                        self.rec.action = "block";
                        self.rec.mode = "enforce";
                        self.rec.rule = rule;
                    }
                    Some(why)
                }
            }
        };
        let rec = &mut self.rec;
        stats.note(rec);
        let reason = settle(meter.as_mut(), &state, rec).or(reason);
        if let Some(r) = reason {
            rec.reason = format!("{}; closed: {r}", rec.reason).into();
        }
        let Open {
            rec,
            start,
            permits,
            stream_slot,
            ..
        } = self;
        state.finish(rec, start);
        drop((permits, stream_slot));
    }
}

/// Marks a head as a WebSocket upgrade: the fields hop-by-hop stripping took, or the pool's
/// connection would not switch.
fn upgrading(headers: &mut HeaderMap) {
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Whether any of `name`'s fields lists `token` (comma-separated, any case).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_in_lists_and_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "keep-alive".parse().unwrap());
        h.append(header::CONNECTION, "Keep-Alive ,  UPGRADE".parse().unwrap());
        h.insert(header::UPGRADE, "WebSocket".parse().unwrap());
        assert!(has_token(&h, &header::CONNECTION, "upgrade"));
        assert!(has_token(&h, &header::UPGRADE, "websocket"));
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        assert!(!has_token(&h, &header::UPGRADE, "websocket"));
        h.insert(header::UPGRADE, "websocketx, h2c".parse().unwrap());
        assert!(!has_token(&h, &header::UPGRADE, "websocket"));
    }
}
