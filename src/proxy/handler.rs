//! One request: identify, normalise the target, decide, then block or forward, and account for
//! it. CONNECT is handed to [`super::connect`]; everything else is absolute-form HTTP.

use std::convert::Infallible;
use std::error::Error as _;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use super::body::{Counted, Pending, ProxyBody};
use super::limit::{self, ByteMeter, Refused};
use super::{respond, Peer, State};
use crate::audit::{redact_path, Record};
use crate::error::ProxyError;
use crate::identity::htpasswd::parse_basic;
use crate::limits::{KeyValues, Permit};
use crate::policy::{self, target, Action, Decision, Host, Mode};

const VIA: &str = "1.1 portcullis";

/// The service function behind every client connection.
pub async fn handle(
    state: Arc<State>,
    peer: Peer,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() == Method::CONNECT {
        return Ok(super::connect::handle(state, peer, req).await);
    }
    Ok(forward(state, peer, req).await)
}

/// Facts about the request that every audit record repeats.
pub struct Seen<'a> {
    pub peer: Peer,
    pub user: Option<&'a str>,
    pub method: &'a Method,
    pub scheme: &'static str,
    pub host: &'a Host,
    pub port: u16,
    pub path: Option<&'a str>,
    pub tls: &'static str,
}

/// A record for a decision; status and byte counts are filled in later.
pub fn record(seen: &Seen<'_>, d: &Decision<'_>, status: u16, key_id: Option<String>) -> Record {
    Record {
        ts: SystemTime::now(),
        id: 0,
        client: seen.peer.addr,
        user: seen.user.map(Into::into),
        method: seen.method.clone(),
        scheme: seen.scheme,
        host: seen.host.to_string().into_boxed_str(),
        port: seen.port,
        path: seen.path.map(redact_path),
        vendor: d.vendor_id().cloned(),
        endpoint: d.endpoint.as_str(),
        rule: d.rule_id().cloned(),
        action: d.action.as_str(),
        mode: d.mode.as_str(),
        reason: d.reason.clone(),
        status,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.0,
        tls: seen.tls,
        sni: None,
        key_id: key_id.map(Into::into),
    }
}

/// A record for a request refused before any decision (malformed, unauthenticated).
pub fn rejected(
    state: &State,
    peer: Peer,
    method: &Method,
    uri: &Uri,
    e: &ProxyError,
    start: Instant,
) {
    let rec = Record {
        ts: SystemTime::now(),
        id: state.audit.next_id(),
        client: peer.addr,
        user: None,
        method: method.clone(),
        scheme: uri
            .scheme_str()
            .map_or("none", |s| if s == "https" { "https" } else { "http" }),
        host: uri.host().unwrap_or("").into(),
        port: uri.port_u16().unwrap_or(0),
        path: uri.path_and_query().map(|p| redact_path(p.as_str())),
        vendor: None,
        endpoint: "none",
        rule: None,
        action: "reject",
        mode: "enforce",
        reason: e.kind().into(),
        status: e.status().as_u16(),
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.0,
        tls: "none",
        sni: None,
        key_id: None,
    };
    state.finish(rec, start);
}

/// A decided request the policy lets through, with what it holds while it runs.
pub struct Admitted {
    pub rec: Record,
    pub permits: Vec<Permit>,
    pub meter: Option<ByteMeter>,
}

/// Enforces a decision: 403 when blocked, 429 when over a limit (each audited here), else the
/// request goes on with its limit permits and byte meter. Shared by requests and CONNECTs.
pub async fn admit(
    state: &State,
    d: &Decision<'_>,
    mut rec: Record,
    peer: Peer,
    user: Option<&str>,
    html: bool,
    start: Instant,
) -> Result<Admitted, Response<ProxyBody>> {
    if d.enforced() == Action::Block {
        rec.status = 403;
        state.finish(rec, start);
        return Err(respond::blocked(d, html));
    }
    match apply_limits(state, d, &mut rec, peer, user).await {
        Ok((permits, meter)) => Ok(Admitted {
            rec,
            permits,
            meter,
        }),
        Err(refused) => {
            rec.status = 429;
            state.finish(rec, start);
            Err(respond::limited(d, &refused, html))
        }
    }
}

/// Limits of a `limit` rule: the permits and byte meter to hold for the exchange, or the
/// refusal (enforced) — a shadow rule only records what it would have refused.
async fn apply_limits(
    state: &State,
    d: &Decision<'_>,
    rec: &mut Record,
    peer: Peer,
    user: Option<&str>,
) -> Result<(Vec<Permit>, Option<ByteMeter>), Refused> {
    let Some(rule) = d.rule.filter(|_| d.action == Action::Limit) else {
        return Ok((Vec::new(), None));
    };
    let kv = KeyValues {
        client: peer.addr.ip(),
        user,
        key_id: rec.key_id.as_deref(),
        vendor: d.vendor_id().map(|v| &**v),
    };
    match limit::admit(&state.limiter, rule, &kv).await {
        Ok(permits) => {
            // Within its limits the request is simply allowed; "limit" means refused.
            if d.mode == Mode::Enforce {
                rec.action = Action::Allow.as_str();
            }
            Ok((permits, ByteMeter::for_rule(&state.limiter, rule, &kv)))
        }
        Err(refused) => {
            rec.reason = format!(
                "rate_limited: {} (retry after {}s); {}",
                refused.limit, refused.retry_after, rule.reason
            )
            .into();
            if d.mode == Mode::Shadow {
                return Ok((Vec::new(), None));
            }
            let vendor = d.vendor_id().map_or("none", |v| &**v);
            state
                .metrics
                .rate_limited
                .with_label_values(&[vendor, &rule.id])
                .inc();
            Err(refused)
        }
    }
}

/// The proxy user, when `[auth]` is configured. `Err` = answer 407.
pub async fn authenticate(
    state: &State,
    headers: &HeaderMap,
) -> Result<Option<String>, ProxyError> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    if let Some((user, password)) = headers
        .get(header::PROXY_AUTHORIZATION)
        .and_then(parse_basic)
    {
        if auth.htpasswd.verify(&user, &password).await {
            return Ok(Some(user));
        }
    }
    if auth.required {
        Err(ProxyError::AuthRequired)
    } else {
        Ok(None)
    }
}

async fn forward(state: Arc<State>, peer: Peer, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let html = respond::wants_html(req.headers());
    let realm = state.auth.as_ref().map(|a| a.realm.as_str());
    if let Err(e) = state.audit_admits() {
        return respond::error(&e, realm, html);
    }

    let target = match target::from_uri(req.uri()) {
        Ok(t) => t,
        Err(e) => {
            let e = if req.uri().scheme().is_none() {
                ProxyError::NotProxyRequest
            } else {
                ProxyError::Target(e)
            };
            rejected(&state, peer, req.method(), req.uri(), &e, start);
            return respond::error(&e, realm, html);
        }
    };
    if let Err(e) = framing(req.headers()) {
        rejected(&state, peer, req.method(), req.uri(), &e, start);
        return respond::error(&e, realm, html);
    }
    let user = match authenticate(&state, req.headers()).await {
        Ok(u) => u,
        Err(e) => {
            rejected(&state, peer, req.method(), req.uri(), &e, start);
            return respond::error(&e, realm, html);
        }
    };

    let policy = state.policy.load_full();
    let path_q = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let d = policy.decide(&policy::Request {
        client: peer.addr.ip(),
        user: user.as_deref(),
        method: req.method(),
        host: &target.host,
        port: target.port,
        path: Some(path_q),
    });
    let seen = Seen {
        peer,
        user: user.as_deref(),
        method: req.method(),
        scheme: target.scheme.as_str(),
        host: &target.host,
        port: target.port,
        path: Some(path_q),
        tls: "none",
    };
    let key_id = state.keys.from_request(req.headers(), req.uri().query());
    let mut rec = record(&seen, &d, 0, key_id);
    rec.id = state.audit.next_id();

    let Admitted {
        mut rec,
        permits,
        meter,
    } = match admit(&state, &d, rec, peer, user.as_deref(), html, start).await {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };

    let authority = target.authority();
    let uri = match Uri::try_from(format!("{}://{authority}{path_q}", target.scheme.as_str())) {
        Ok(u) => u,
        Err(_) => {
            let e = ProxyError::Target(target::TargetError::InvalidHost("unrepresentable"));
            rec.status = 400;
            rec.reason = e.kind().into();
            state.finish(rec, start);
            return respond::error(&e, realm, html);
        }
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    append_via(&mut parts.headers);
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let uploaded = Arc::new(AtomicU64::new(0));
    let body =
        Counted::shared(body, uploaded.clone()).idle_timeout(state.settings.proxy.body_timeout);
    let upstream_req = Request::from_parts(parts, body);

    let timeout = state.settings.upstream.response_timeout;
    let result = match tokio::time::timeout(timeout, state.client.request(upstream_req)).await {
        Err(_) => Err(ProxyError::ResponseTimeout),
        Ok(Err(e)) => Err(upstream_error(&e)),
        Ok(Ok(resp)) => Ok(resp),
    };
    match result {
        Err(e) => {
            if e.is_upstream() {
                state
                    .metrics
                    .upstream_errors
                    .with_label_values(&[e.kind()])
                    .inc();
            }
            rec.status = e.status().as_u16();
            rec.reason = format!("{}: {}", e.kind(), e).into();
            if matches!(e, ProxyError::AddressDenied(_)) {
                // The policy allowed it, the address guard refused it: the request was blocked.
                rec.action = Action::Block.as_str();
            }
            rec.bytes_out = uploaded.load(std::sync::atomic::Ordering::Relaxed);
            state.finish(rec, start);
            respond::error(&e, realm, html)
        }
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            append_via(&mut parts.headers);
            rec.status = parts.status.as_u16();
            let pending = Pending {
                state: state.clone(),
                record: rec,
                start,
                uploaded,
                permits,
                meter,
            };
            Response::from_parts(parts, Either::Right(Counted::finishing(body, pending)))
        }
    }
}

/// What hyper's parser lets through but a proxy must not forward as is: two Host fields
/// (RFC 9112 §3.2: 400), and transfer codings other than chunked, which we would strip (the
/// field is hop-by-hop) without decoding, changing the content (RFC 9112 §6.1: 501).
fn framing(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::DuplicateHost);
    }
    for v in headers.get_all(header::TRANSFER_ENCODING) {
        let text = v.to_str().unwrap_or("?");
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(ProxyError::UnsupportedTransferCoding(coding.to_string()));
            }
        }
    }
    Ok(())
}

/// RFC 9110 §7.6.1: connection-specific fields, and any the Connection header names, are for
/// one hop only. `Proxy-Authorization` is ours and never goes upstream.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn append_via(h: &mut HeaderMap) {
    let v = match h.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {VIA}"))
            .unwrap_or(HeaderValue::from_static(VIA)),
        None => HeaderValue::from_static(VIA),
    };
    h.insert(header::VIA, v);
}

/// The pooled client wraps our connector's error; dig it out so the client and the audit log
/// see what really failed.
fn upstream_error(e: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut src = e.source();
    while let Some(s) = src {
        // The only body we hand the client is the client's own upload: its failure (a bad
        // chunk, a cut connection) is the client's fault, not the origin's.
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if let Some(e) = super::stall::classify_hyper(h) {
                return e;
            }
        }
        if let Some(p) = s.downcast_ref::<ProxyError>() {
            return match p {
                ProxyError::Dns(m) => ProxyError::Dns(m.clone()),
                ProxyError::NoAddress => ProxyError::NoAddress,
                ProxyError::AddressDenied(d) => ProxyError::AddressDenied(d.clone()),
                ProxyError::Connect(io) => {
                    ProxyError::Connect(std::io::Error::new(io.kind(), io.to_string()))
                }
                ProxyError::ConnectTimeout => ProxyError::ConnectTimeout,
                ProxyError::Tls(m) => ProxyError::Tls(m.clone()),
                other => ProxyError::Upstream(other.to_string()),
            };
        }
        src = s.source();
    }
    let mut msg = e.to_string();
    if let Some(s) = e.source() {
        msg = format!("{msg}: {s}");
    }
    ProxyError::Upstream(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed_including_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("authorization", "Bearer x".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }
}
