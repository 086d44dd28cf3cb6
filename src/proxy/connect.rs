//! CONNECT: decide on host:port before any upstream connection, connect (guarded), answer 200,
//! peek the ClientHello, refuse a tunnel whose SNI the policy blocks (domain fronting), then
//! splice bytes and write one audit record at close.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::client_socket::ClientSocket;
use super::handler::{admit, authenticate, still_authorised, Admitted, Who};
use super::intercept::{self, Inside};
use super::limit::ByteMeter;
use super::metered::{settle, Metered, Stats};
use super::on_wake::OnWake;
use super::records::{record, rejected, Arrived, ArrivedParts, AskedUnanswered, Seen, Unanswered};
use super::stall::SendTimeout;
use super::tunnel_upstream::TunnelUpstream;
use super::{respond, Peer, State};
use crate::audit::Record;
use crate::error::ProxyError;
use crate::identity::ProxyUser;
use crate::metrics::Active;
use crate::policy::{self, target, Action, Host, Policy};
use crate::tls::rewind::Rewind;
use crate::tls::sni::{is_hello_retry, peek_client_hello, peek_retried_client_hello, SniError};

/// A ClientHello larger than this is not a browser or SDK; refuse rather than buffer.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

pub async fn handle(arrived: Arrived) -> Response<ProxyBody> {
    let ArrivedParts {
        state,
        peer,
        mut req,
        ..
    } = arrived.open();
    let start = Instant::now();
    let html = respond::wants_html(req.headers());
    let realm = state.auth.as_ref().map(|a| a.realm.as_str());
    let reject = |e: ProxyError| {
        rejected(&state, peer, None, (&req).into(), &e, start);
        respond::error(&e, realm, html)
    };

    if let Err(e) = state.audit_admits() {
        return respond::error(&e, realm, html);
    }
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let (host, port) = match target::from_connect_authority(authority) {
        Ok(hp) => hp,
        Err(e) => return reject(ProxyError::Target(e)),
    };
    // A login can take a while (bcrypt): a client gone meanwhile is still recorded.
    let waiting = AskedUnanswered::arm(&state, peer, None, (&req).into(), start);
    let login = authenticate(&state, peer.addr.ip(), req.headers()).await;
    waiting.disarm();
    let user = match login {
        Ok(u) => u,
        Err(e) => return reject(e),
    };
    let policy = state.policy.load_full();
    let d = policy.decide(&policy::Request {
        client: peer.addr.ip(),
        user: user.as_ref().map(ProxyUser::name),
        method: &Method::CONNECT,
        host: &host,
        port,
        path: None,
        body: Default::default(),
    });
    // Listed vendors and hosts are opened (when a CA is configured); the rest stay opaque.
    let intercept = state.interceptor.load().is_some()
        && !policy.intercept.is_empty()
        && policy
            .intercept
            .intercepts(&host, policy.catalog.lookup(&host).map(|h| h.vendor));
    let seen = Seen {
        peer,
        user: user.as_ref().map(ProxyUser::name),
        method: &Method::CONNECT,
        scheme: "https",
        host: &host,
        port,
        path: None,
        // `intercept` once admitted: a CONNECT refused here opened nothing to intercept.
        tls: "tunnel",
    };
    let mut rec = record(&seen, &d, 0, None);
    rec.id = state.audit.next_id();

    // A blocked destination is reported as blocked whatever the port.
    if !policy.connect_ports.contains(&port) && d.enforced() != Action::Block {
        let e = ProxyError::PortNotAllowed(port);
        rec.status = 403;
        rec.action = "block";
        rec.reason = e.kind().into();
        rec.rule = None;
        state.finish(rec, start);
        return respond::error(&e, realm, html);
    }

    // A tenant restriction cannot be checked in an opaque tunnel (no key, no headers): fail
    // closed rather than let any account through.
    if let Some(rule) = d.rule.filter(|r| {
        !intercept
            && d.enforced() != Action::Block
            && (!r.require_keys.is_empty() || !r.require_orgs.is_empty())
    }) {
        let why = format!(
            "key_not_allowed: rule {} admits only the organisation's accounts, which an opaque tunnel cannot show; intercept this vendor",
            rule.id
        );
        rec.status = 403;
        rec.action = Action::Block.as_str();
        rec.reason = why.clone().into();
        state.finish(rec, start);
        return respond::blocked_because(&d, &why, html);
    }

    // What later checks of the tunnel (its SNI, a reload) measure it against.
    let admitted_by = Admission {
        rule: d.rule_id().cloned(),
        vendor: d.vendor_id().cloned(),
        limited: !intercept && d.enforced() == Action::Limit,
    };
    // An intercepted tunnel's requests are limited one by one; the tunnel itself only needs
    // to be allowed, so its limits are not charged twice.
    let admitted = if intercept && d.enforced() != Action::Block {
        // Nothing was counted, so nothing refused: "limit" on a record means refused.
        if d.enforced() == Action::Limit {
            rec.action = Action::Allow.as_str();
        }
        Ok(Admitted {
            rec,
            permits: Vec::new(),
            meter: None,
        })
    } else {
        let who = Who {
            peer,
            user: user.as_ref().map(ProxyUser::name),
            keys: &[],
        };
        admit(&state, &d, rec, who, html, start).await
    };
    let Admitted {
        mut rec,
        permits,
        meter,
    } = match admitted {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };

    // Connect before answering 200 so the client gets a real 502/504, as squid does. An
    // intercepted tunnel's requests each go through the pool instead, and get theirs there.
    // A client that gives up while the connect is pending (up to `connect_timeout`) has
    // already been admitted and charged: its record is still written.
    let upstream = match intercept {
        true => Ok(None),
        false => {
            let waiting = Unanswered::arm(&state, rec, start, None);
            let connected = state.upstream.connect(&host, port).await;
            rec = waiting.disarm();
            connected.map(|(s, _)| Some(s))
        }
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            super::records::failed(&state, &mut rec, &e);
            state.finish(rec, start);
            return respond::error(&e, realm, html);
        }
    };

    rec.status = 200;
    if intercept {
        rec.tls = "intercept";
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel = Tunnel {
        _token: state.shutdown.token(),
        state: state.clone(),
        policy,
        peer,
        user,
        host,
        port,
        rec,
        start,
        admitted_by,
        _permits: permits,
        meter,
        sni_vouched: false,
    };
    tokio::spawn(tunnel.run(on_upgrade, upstream));
    let mut resp = Response::new(Either::Left(Full::default()));
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// What [`Tunnel::check_sni`] refuses a server name of another vendor than the CONNECT host's
/// for.
const ANOTHER_VENDOR: &str = "another vendor";

/// The CONNECT decision a tunnel was let through on: its rule, its vendor (whose keys any
/// limits were charged to), and whether limits were charged at all.
struct Admission {
    rule: Option<Arc<str>>,
    vendor: Option<Arc<str>>,
    limited: bool,
}

struct Tunnel {
    /// Keeps shutdown waiting for this tunnel's audit record.
    _token: super::shutdown::Token,
    state: Arc<State>,
    policy: Arc<Policy>,
    peer: Peer,
    user: Option<ProxyUser>,
    host: Host,
    port: u16,
    rec: Box<Record>,
    start: Instant,
    admitted_by: Admission,
    /// In-flight slots of `concurrent` limits: a tunnel holds one for its whole life.
    _permits: Vec<crate::limits::Permit>,
    meter: Option<ByteMeter>,
    /// The SNI names a vendor the CONNECT did not, and resolves to the address dialled (see
    /// [`Tunnel::sni_leads_to`]): only then is the tunnel put on that vendor's record, at a
    /// reload too.
    sni_vouched: bool,
}

impl Tunnel {
    async fn run(mut self, on_upgrade: OnUpgrade, upstream: Option<TcpStream>) {
        let _active = Active::count(&self.state.metrics.tunnels_active);
        let mut shutdown = self.state.shutdown_signal();

        let mut client = match on_upgrade.await.map(unwrap_client) {
            Ok(Some(c)) => c,
            Ok(None) => {
                self.close("upgrade_failed: not a client TCP connection".into());
                return;
            }
            Err(e) => {
                self.close(format!("upgrade_failed: {e}"));
                return;
            }
        };

        // Taken before anything is read: a reload from here on is seen by the splice loop's
        // `changed()`, and one since the CONNECT was decided by the check below.
        let mut swaps = self.state.policy_swapped.subscribe();
        let mut hello = BytesMut::with_capacity(2048);
        let settings = &self.state.settings.proxy;
        let peeked = tokio::select! {
            p = tokio::time::timeout(
                settings.client_hello_timeout,
                peek_client_hello(&mut client, &mut hello, MAX_CLIENT_HELLO),
            ) => p,
            _ = shutdown.stopping() => return self.close("shutdown".into()),
        };
        // The first hello's SNI, when the tunnel carries TLS.
        let mut tls_sni: Option<Option<String>> = None;
        let mut hello_len = hello.len();
        match peeked {
            Ok(Ok(info)) => {
                tls_sni = Some(info.sni.clone());
                hello_len = info.len;
                if let Some(sni) = info.sni {
                    let mut refusal = self.check_sni(&sni, upstream.is_some());
                    if let (None, Some(up)) = (&refusal, &upstream) {
                        // Boxed: a lookup's state would otherwise sit in every tunnel's task
                        // (see the boxed `intercept` below), for a check few tunnels need.
                        refusal = Box::pin(self.vouch_for_sni(&sni, up)).await;
                    }
                    self.rec.sni = Some(sni.into());
                    if let Some(refusal) = refusal {
                        self.close(refusal);
                        return;
                    }
                }
            }
            Ok(Err(SniError::NotTls)) if !settings.tunnel_require_tls => {}
            Ok(Err(e)) => {
                let kind = e.kind();
                self.close(format!("{kind}: {}", ProxyError::ClientHello(e)));
                return;
            }
            Err(_) => {
                self.close(ProxyError::ClientHelloTimeout.kind().to_string());
                return;
            }
        }

        let Some(upstream) = upstream else {
            // Each request inside is decided on the policy of its time. Boxed: inline, the TLS
            // accept and HTTP server inside (7 KB) sized every tunnel's task, opaque ones too,
            // whose splice needs under 2 KB (8,320 bytes a task, in mimalloc's 10 KiB class).
            return Box::pin(self.intercept(client, hello.freeze())).await;
        };
        // An opaque tunnel held between its 200 and its hello while a reload lands must not
        // go on under the policy it was admitted by.
        if !Arc::ptr_eq(&self.policy, &self.state.policy.load()) {
            if let Some(why) = self.decide_again() {
                return self.close(why);
            }
        }
        let stats = Stats::new(self.start);
        let mut meter = self.meter.take();
        let mut upstream = Metered::new(upstream, &stats, meter.as_mut());
        let sent_hello = tls_sni.is_some();
        if let Some(sni) = tls_sni {
            let wait = self.state.settings.proxy.client_hello_timeout;
            let followed = tokio::select! {
                f = tokio::time::timeout(
                    wait,
                    follow_hello_retry(&mut client, &mut upstream, &hello, hello_len, sni.as_deref()),
                ) => f,
                _ = shutdown.stopping() => return self.close("shutdown".into()),
            };
            let refused = match followed {
                Ok(Ok(())) => None,
                Ok(Err(Retry::Renamed(second))) => {
                    // Attributes the tunnel to the vendor the second name reaches, if any.
                    let _ = self.check_sni(&second, true);
                    Some(format!(
                        "sni_mismatch: the ClientHello after a HelloRetryRequest names {second:?}, \
                         the first named {:?}",
                        sni.as_deref().unwrap_or("")
                    ))
                }
                Ok(Err(Retry::Failed(why))) => Some(why),
                Err(_) => {
                    Some("server_hello_timeout: the origin did not answer the ClientHello".into())
                }
            };
            if let Some(why) = refused {
                stats.note(&mut self.rec);
                self.close(why);
                return;
            }
        }
        let idle = self.state.settings.proxy.idle_timeout;
        // The copy borrows both ends; its scope ends before the meter is read below.
        let reason = {
            let outcome = async {
                if !sent_hello {
                    upstream.write_all(&hello).await?;
                }
                // An idle tunnel keeps no buffers: not the peeked hello, not copy buffers.
                drop(hello);
                let half_closed = idle.min(HALF_CLOSED_IDLE);
                super::splice::splice(&mut client, &mut upstream, 16 * 1024, half_closed).await
            };
            // What ends a tunnel besides its ends: polled only when one of them woke the task,
            // not on each of the copy's wake-ups.
            let watchers = OnWake::new(async {
                loop {
                    tokio::select! {
                        _ = stats.activity.idle(idle) => break "idle_timeout".to_string(),
                        _ = shutdown.stopping() => break "shutdown".to_string(),
                        Ok(()) = swaps.changed() => {
                            if let Some(why) = self.decide_again() {
                                break why;
                            }
                        }
                    }
                }
            });
            tokio::select! {
                r = outcome => match r {
                    Ok(_) => None,
                    Err(e) => Some(format!("tunnel_error: {e}")),
                },
                why = watchers => Some(why),
            }
        };
        drop(upstream);
        stats.note(&mut self.rec);
        let reason = settle(meter.as_mut(), &self.state, &mut self.rec).or(reason);
        match reason {
            // The decision that closed it replaces the one that opened it.
            Some(r) if r.starts_with("policy_reloaded") => self.rec.reason = r.into(),
            Some(r) => self.rec.reason = format!("{}; closed: {r}", self.rec.reason).into(),
            None => {}
        }
        self.state.finish(self.rec, self.start);
    }

    /// After a reload: an opaque tunnel lives on the decision it was opened with, so a rule
    /// added since (block DeepSeek now, cap this vendor, intercept it) would not reach a
    /// long-lived HTTP/2 connection until the client reconnects. `Some(reason)` = close it.
    fn decide_again(&mut self) -> Option<String> {
        self.policy = self.state.policy.load_full();
        let d = self.policy.decide(&policy::Request {
            client: self.peer.addr.ip(),
            user: self.user.as_ref().map(ProxyUser::name),
            method: &Method::CONNECT,
            host: &self.host,
            port: self.port,
            path: None,
            body: Default::default(),
        });
        // What a new CONNECT would now be refused for before any rule: not the rule's doing.
        let refused = if !self.policy.connect_ports.contains(&self.port) {
            Some(ProxyError::PortNotAllowed(self.port).kind())
        } else if let Some(u) = self
            .user
            .as_ref()
            .filter(|u| !still_authorised(&self.state, u))
        {
            tracing::debug!(
                user = u.name(),
                "tunnel's proxy user no longer in the user file"
            );
            Some("proxy_user_revoked")
        } else {
            None
        };
        if let Some(why) = refused.filter(|_| d.enforced() != Action::Block) {
            self.rec.vendor = d.vendor_id().cloned();
            self.rec.endpoint = d.endpoint.as_str();
            self.rec.rule = None;
            self.rec.action = "block";
            self.rec.mode = "enforce";
            return Some(format!("policy_reloaded: {why}"));
        }
        let unmet = match d.enforced() {
            Action::Block => Some(d.reason.to_string()),
            _ => self.unmet_by_tunnel(&d, &self.host).map(|what| {
                format!(
                    "rule {} needs {what}",
                    d.rule_id().map_or("default", |r| &**r)
                )
            }),
        };
        if let Some(why) = unmet {
            self.rec.vendor = d.vendor_id().cloned();
            self.rec.endpoint = d.endpoint.as_str();
            self.rec.rule = d.rule_id().cloned();
            self.rec.action = "block";
            self.rec.mode = d.mode.as_str();
            return Some(format!("policy_reloaded: {why}"));
        }
        let sni = self.rec.sni.clone()?;
        self.check_sni(&sni, true)
            .map(|why| format!("policy_reloaded: {why}"))
    }

    /// `Some(reason)` when the SNI names a host the policy blocks, or (in an opaque tunnel) a
    /// host whose rule asks for more than this tunnel was given: limits it was not charged,
    /// a tenant restriction or interception it cannot have. Otherwise `CONNECT <allowed or
    /// bare IP>` with the SNI of a limited vendor would escape that vendor's rules.
    fn check_sni(&mut self, sni: &str, opaque: bool) -> Option<String> {
        let sni_host = match Host::parse(sni) {
            Ok(h) => h,
            Err(e) => return Some(format!("sni_invalid: {e}")),
        };
        if sni_host == self.host {
            return None;
        }
        let d = self.policy.decide(&policy::Request {
            client: self.peer.addr.ip(),
            user: self.user.as_ref().map(ProxyUser::name),
            method: &Method::CONNECT,
            host: &sni_host,
            port: self.port,
            path: None,
            body: Default::default(),
        });
        let unmet = match d.enforced() {
            Action::Block => None,
            // An intercepted tunnel dials the CONNECT host itself and decides each request.
            _ if !opaque => return None,
            // One vendor's host with another's name: no client does that but to front. Which
            // vendor's data would flow is up to the origin, and the client would pick the
            // vendor its record, limits and bulk signals are charged to.
            _ if d.vendor.is_some()
                && self.admitted_by.vendor.is_some()
                && d.vendor_id() != self.admitted_by.vendor.as_ref() =>
            {
                Some(ANOTHER_VENDOR)
            }
            _ => self.unmet_by_tunnel(&d, &sni_host),
        };
        if d.enforced() != Action::Block && unmet.is_none() {
            // Whose the tunnel is, by a name the CONNECT did not give: only once vouched for.
            if self.admitted_by.vendor.is_none() && !self.sni_vouched {
                return None;
            }
            // Let through under both names. A CONNECT that named no vendor (an address, a
            // CDN's name) is the vendor's whose name the server is asked for; and an audit or
            // shadow rule on that name is what the record shows over a plain allow, or a
            // CONNECT by address would hide the use such a rule exists to see. (A shadow
            // limit is not: the tunnel was not counted against it.)
            if self.rec.vendor.is_none() {
                self.rec.vendor = d.vendor_id().cloned();
                self.rec.endpoint = d.endpoint.as_str();
            }
            let sni_says_more = d.rule.is_some()
                && d.action != Action::Limit
                && (d.mode == policy::Mode::Shadow || d.action != Action::Allow);
            if sni_says_more && self.admitted_as_plain_allow() {
                self.rec.rule = d.rule_id().cloned();
                self.rec.action = d.action.as_str();
                self.rec.mode = d.mode.as_str();
                self.rec.reason = format!("SNI {sni}: {}", d.reason).into();
            }
            return None;
        }
        self.rec.vendor = d.vendor_id().cloned();
        self.rec.endpoint = d.endpoint.as_str();
        self.rec.rule = d.rule_id().cloned();
        self.rec.action = "block";
        self.rec.mode = d.mode.as_str();
        Some(match unmet {
            None => format!(
                "sni_mismatch: SNI {sni} differs from CONNECT host; {}",
                d.reason
            ),
            Some(ANOTHER_VENDOR) => format!(
                "sni_mismatch: SNI {sni} is {}'s, the CONNECT host {} another vendor's",
                d.vendor_id().map_or("", |v| &**v),
                self.host,
            ),
            Some(what) => format!(
                "sni_mismatch: SNI {sni} differs from CONNECT host {} and its rule {} needs {what}, which this tunnel did not get",
                self.host,
                d.rule_id().map_or("default", |r| &**r),
            ),
        })
    }

    /// A CONNECT to an address, or to a name no vendor has, whose ClientHello names a vendor's
    /// host: the tunnel is that vendor's if the name resolves to the address dialled (then
    /// `check_sni` again, to put it on the vendor's record and rules), and is refused if not.
    /// Let through unattributed, any destination's traffic could dodge the vendor's audit and
    /// shadow rules and bulk signals by address; attributed unchecked, it could be put on the
    /// record of a vendor the client picks. (A name that is blocked was refused already.)
    async fn vouch_for_sni(&mut self, sni: &str, upstream: &TcpStream) -> Option<String> {
        let Ok(sni_host) = Host::parse(sni) else {
            return None;
        };
        let vendor = self.policy.catalog.lookup(&sni_host).map(|h| h.vendor);
        if self.admitted_by.vendor.is_some() || sni_host == self.host || vendor.is_none() {
            return None;
        }
        if !self.sni_leads_to(sni, upstream).await {
            let vendor = vendor.map(|v| self.policy.catalog.vendor(v).id.clone());
            self.rec.vendor = vendor.clone();
            self.rec.action = "block";
            return Some(format!(
                "sni_mismatch: SNI {sni} is {}'s and does not resolve to {}, the address the CONNECT to {} reached",
                vendor.as_deref().unwrap_or(""),
                upstream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
                self.host,
            ));
        }
        self.sni_vouched = true;
        self.check_sni(sni, true)
    }

    /// Whether `sni` resolves to the address this opaque tunnel dialled.
    async fn sni_leads_to(&self, sni: &str, upstream: &TcpStream) -> bool {
        let (Ok(host), Ok(dialled)) = (Host::parse(sni), upstream.peer_addr()) else {
            return false;
        };
        self.state
            .upstream
            .resolve(&host, self.port)
            .await
            .is_ok_and(|addrs| {
                addrs.iter().any(|a| {
                    a.ip().to_canonical() == dialled.ip().to_canonical()
                        && a.port() == dialled.port()
                })
            })
    }

    /// Whether the CONNECT was let through as a plain allow: by default or an `allow` rule,
    /// enforced, and no limit's (a limit that admitted is recorded as `allow` too, and its rule
    /// must stay on the record that was charged to it).
    fn admitted_as_plain_allow(&self) -> bool {
        self.rec.mode == "enforce" && self.rec.action == "allow" && !self.admitted_by.limited
    }

    /// What `host`'s decision requires that a tunnel admitted under its CONNECT decision did
    /// not get. Its limits were charged only if the CONNECT was admitted by that rule, as a
    /// limit, for that vendor; its tenant restriction was checked if by that rule.
    fn unmet_by_tunnel(&self, d: &policy::Decision<'_>, host: &Host) -> Option<&'static str> {
        let admitted = &self.admitted_by;
        let same_rule = d.rule_id() == admitted.rule.as_ref();
        if let Some(rule) = d.rule {
            // Charged already: by this rule as a limit (not the same id made a limit by a
            // reload), to this vendor's keys (`by = "vendor"` counts each apart).
            let charged =
                same_rule && admitted.limited && d.vendor_id() == admitted.vendor.as_ref();
            if d.enforced() == Action::Limit && !charged {
                return Some("limits");
            }
            if !same_rule
                && d.mode == policy::Mode::Enforce
                && (!rule.require_keys.is_empty() || !rule.require_orgs.is_empty())
            {
                return Some("a tenant restriction");
            }
        }
        let vendor = self.policy.catalog.lookup(host).map(|h| h.vendor);
        let intercepted = self.state.interceptor.load().is_some()
            && !self.policy.intercept.is_empty()
            && self.policy.intercept.intercepts(host, vendor);
        intercepted.then_some("interception")
    }

    /// Serves the tunnel's requests through the handler over TLS from the org CA, then writes
    /// the tunnel's own record (each request has written its own).
    async fn intercept(mut self, client: ClientIo, hello: Bytes) {
        let inside = Arc::new(Inside {
            host: self.host.clone(),
            port: self.port,
            user: self.user.take(),
            sni: self.rec.sni.clone(),
            requests: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            upstream: TunnelUpstream::new(
                self.state.upstream.clone(),
                &self.state.settings.upstream,
            ),
        });
        let io = Rewind::new(hello, client);
        let outcome = intercept::serve(self.state.clone(), self.peer, inside.clone(), io).await;
        let n = inside.requests.load(Ordering::Relaxed);
        let mut reason = format!("{}; intercepted, {n} requests", self.rec.reason);
        if let Err(e) = outcome {
            if e.starts_with("policy_reloaded") {
                self.rec.action = "block";
            }
            reason.push_str("; closed: ");
            reason.push_str(&e);
        }
        self.rec.reason = reason.into();
        self.rec.bytes_out = inside.from_client.load(Ordering::Relaxed);
        self.rec.bytes_in = inside.to_client.load(Ordering::Relaxed);
        self.state.finish_intercepted(self.rec, self.start);
    }

    /// Ends a tunnel that never reached the splice. The CONNECT was answered 200, but what
    /// the proxy then refused is not an allowed tunnel: a name the policy blocks is `block`,
    /// bytes that are not the TLS the tunnel must carry are `reject`. An origin or client that
    /// failed or went away keeps the decision it was admitted with.
    fn close(mut self, reason: String) {
        const REJECTED: [&str; 5] = [
            "not_tls",
            "client_hello_malformed",
            "client_hello_too_large",
            "client_hello_incomplete",
            "client_hello_timeout",
        ];
        if ["sni_mismatch", "sni_invalid", "policy_reloaded"]
            .iter()
            .any(|p| reason.starts_with(p))
        {
            self.rec.action = "block";
        } else if REJECTED.iter().any(|p| reason.starts_with(p)) {
            self.rec.action = "reject";
        }
        self.rec.reason = reason.into();
        self.state.finish(self.rec, self.start);
    }
}

/// A tunnel's client connection: the socket the proxy listener accepted, after what hyper had
/// already read from it.
type ClientIo = Rewind<SendTimeout<ClientSocket>>;

/// Takes the client's socket out of hyper's upgrade wrapper, so that the relay reads and writes
/// it without a boxed layer and two adapters in between, twice per request it carries. `None`
/// if the connection is not the listener's (a bug: it is the only one that upgrades).
fn unwrap_client(upgraded: hyper::upgrade::Upgraded) -> Option<ClientIo> {
    let parts = upgraded
        .downcast::<TokioIo<SendTimeout<ClientSocket>>>()
        .ok()?;
    Some(Rewind::new(parts.read_buf, parts.io.into_inner()))
}

/// How long a tunnel one side has closed waits for the other to finish while nothing moves.
const HALF_CLOSED_IDLE: Duration = Duration::from_secs(5);

/// Why a tunnel's handshake was not let through after a HelloRetryRequest.
enum Retry {
    /// The second ClientHello names another server (the name, lowercased; "" for none).
    Renamed(String),
    /// An I/O error or a malformed second hello: the audit reason.
    Failed(String),
}

/// TLS 1.3 lets a server answer a ClientHello with a HelloRetryRequest, and the client then
/// sends a second ClientHello. The SNI check read the first. RFC 8446 §4.1.2 requires the
/// second to name the same server, but servers that route on SNI may honour a changed name,
/// so a client could name an allowed host first and a blocked one second. So: the hello is
/// sent, the server's first record is read (and passed on) before anything more from the
/// client goes upstream, and after a retry request the second hello must name the same
/// server as the first (or none, if the first named none) before it is sent on. What the
/// client sent after its first hello without waiting (`peeked[hello_len..]`: a second hello
/// sent ahead of the retry request, or early data) waits with the rest.
async fn follow_hello_retry<C, U>(
    client: &mut C,
    upstream: &mut U,
    peeked: &[u8],
    hello_len: usize,
    sni: Option<&str>,
) -> Result<(), Retry>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |e: io::Error| Retry::Failed(format!("tunnel_error: {e}"));
    let (hello, ahead) = peeked.split_at(hello_len.min(peeked.len()));
    upstream.write_all(hello).await.map_err(failed)?;
    // Enough to tell a HelloRetryRequest (the first 43 bytes); what else came is passed on
    // here, the rest by the splice. Small, since a tunnel whose origin is slow to answer
    // holds it meanwhile.
    let mut answer = BytesMut::with_capacity(512);
    let retry = loop {
        if let Some(retry) = is_hello_retry(&answer) {
            break retry;
        }
        if upstream.read_buf(&mut answer).await.map_err(failed)? == 0 {
            // The origin closed without answering: the splice passes the end on.
            break false;
        }
    };
    client.write_all(&answer).await.map_err(failed)?;
    if !retry {
        return upstream.write_all(ahead).await.map_err(failed);
    }
    let mut second = BytesMut::with_capacity(2048.max(ahead.len()));
    second.extend_from_slice(ahead);
    let info = peek_retried_client_hello(client, &mut second, MAX_CLIENT_HELLO)
        .await
        .map_err(|e| Retry::Failed(format!("{}: {}", e.kind(), ProxyError::ClientHello(e))))?;
    if info.sni.as_deref() != sni {
        return Err(Retry::Renamed(info.sni.unwrap_or_default()));
    }
    upstream.write_all(&second).await.map_err(failed)
}
