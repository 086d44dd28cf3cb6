//! Audit records made on the request path: one for a decision (filled in as the exchange
//! ends), and the `reject` records for requests refused before any decision.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header;
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Uri};

use super::intercept::Inside;
use super::{Peer, State};
use crate::audit::{redact_path, Record};
use crate::error::ProxyError;
use crate::policy::{Decision, Host};

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
///
/// Boxed from the start: a record is ~330 bytes and moves through admit, the response body
/// and the audit queue; a pointer moves instead.
pub fn record(
    seen: &Seen<'_>,
    d: &Decision<'_>,
    status: u16,
    key_id: Option<String>,
) -> Box<Record> {
    Box::new(Record {
        ts: SystemTime::now(),
        id: 0,
        client: seen.peer.addr,
        user: seen.user.map(Into::into),
        method: seen.method.clone(),
        scheme: seen.scheme,
        // One exact allocation: a name is copied as it is, an address formatted to its length.
        host: match seen.host {
            Host::Name(name) => Box::from(&**name),
            ip => {
                let mut h = String::new();
                ip.push_to(&mut h);
                h.into_boxed_str()
            }
        },
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
        model: None,
        key_ids: Vec::new(),
    })
}

/// What a refused request asked for, as it came.
#[derive(Clone, Copy)]
pub struct Asked<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a, B> From<&'a Request<B>> for Asked<'a> {
    fn from(req: &'a Request<B>) -> Asked<'a> {
        Asked {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        }
    }
}

/// A record for a request refused before any decision (malformed, unauthenticated, another
/// host than its tunnel's). The host is the one the request named (its URI's, else its Host
/// field's, else the tunnel's), with the catalog's vendor for it: a refused attempt at a vendor
/// counts as that vendor's on the dashboards. Inside an intercepted tunnel, the tunnel's user,
/// SNI and `tls` too.
pub fn rejected(
    state: &State,
    peer: Peer,
    inside: Option<&Inside>,
    asked: Asked<'_>,
    e: &ProxyError,
    start: Instant,
) {
    let uri = asked.uri;
    let field = asked
        .headers
        .get(header::HOST)
        .and_then(|v| Authority::try_from(v.as_bytes()).ok());
    // A port written but not a port (`:65616`, `:+80`, `host:`) is logged as 0, not as the
    // scheme's: the request named no port the proxy could go to.
    let port_of = |a: &Authority| match a.port() {
        Some(p) if p.as_str().bytes().all(|b| b.is_ascii_digit()) => Some(p.as_u16()),
        Some(_) => Some(0),
        None => port_written(a).then_some(0),
    };
    let (host, port) = match (uri.authority(), &field) {
        (Some(a), _) => (a.host(), port_of(a)),
        (None, Some(a)) => (a.host(), port_of(a)),
        (None, None) => match inside {
            Some(i) => ("", Some(i.port)),
            None => ("", None),
        },
    };
    let host: Box<str> = match (host, inside) {
        ("", Some(i)) => i.host.to_string().into(),
        (h, _) => h.into(),
    };
    let catalog = &state.policy.load().catalog;
    let hit = Host::parse(&host).ok().and_then(|h| catalog.lookup(&h));
    let vendor = hit.map(|hit| catalog.vendor(hit.vendor).id.clone());
    // `none` is for hosts no vendor has: a vendor's refused request gets its endpoint class
    // (`unknown` for a CONNECT, whose path is not visible).
    let endpoint = hit.map_or("none", |hit| {
        let normal = uri
            .path_and_query()
            .filter(|_| *asked.method != Method::CONNECT)
            .map(|p| crate::policy::path::normalize(p.as_str()));
        let segments = normal.as_deref().map(crate::policy::path::Segments::new);
        catalog.classify(hit, segments.as_ref()).as_str()
    });
    let scheme = match (uri.scheme_str(), inside) {
        (_, Some(_)) | (Some("https"), _) => "https",
        (Some(_), None) => "http",
        // As a decided CONNECT's record says.
        (None, None) if *asked.method == Method::CONNECT => "https",
        (None, None) => "none",
    };
    let rec = Record {
        scheme,
        host,
        // A port left out is the scheme's, as everywhere else in the log.
        port: port.or(inside.map(|i| i.port)).unwrap_or(match scheme {
            "http" => 80,
            "https" => 443,
            _ => 0,
        }),
        path: uri.path_and_query().map(|p| redact_path(p.as_str())),
        vendor,
        user: inside
            .and_then(|i| i.user.as_ref())
            .map(|u| u.name().into()),
        tls: if inside.is_some() {
            "intercept"
        } else {
            "none"
        },
        sni: inside.and_then(|i| i.sni.clone()),
        endpoint,
        ..refusal_record(state, peer, asked.method.clone(), e, e.kind().into())
    };
    state.finish(Box::new(rec), start);
}

/// An allowed exchange the proxy could not complete (the origin failed, or the address guard
/// refused it): counted as an upstream error where it is one, and said in the record.
pub fn failed(state: &State, rec: &mut Record, e: &ProxyError) {
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
        rec.action = crate::policy::Action::Block.as_str();
    }
}

/// Whether a request to the proxy listener asks for its auto-config file (origin-form
/// `GET /proxy.pac` or `/wpad.dat`, as browsers and OS settings fetch it).
pub fn is_pac_fetch<B>(req: &Request<B>) -> bool {
    req.uri().scheme().is_none()
        && matches!(req.uri().path(), "/proxy.pac" | "/wpad.dat")
        && matches!(*req.method(), Method::GET | Method::HEAD)
}

/// Whether an authority has a `:port` part, valid or not (`[::1]` has none).
fn port_written(a: &Authority) -> bool {
    let s = a.as_str();
    s[s.rfind(']').map_or(0, |i| i + 1)..].contains(':')
}

/// A record for a request hyper refused while reading its head (it answered 400, 414 or 431):
/// there is no method or target to log, but the attempt and its client are.
pub fn malformed(state: &State, peer: Peer, e: &hyper::Error) {
    let text = e.to_string();
    // hyper names no public kind for a target too long, only its message; it answered 414.
    let e = match e.is_parse_too_large() {
        true if text.contains("URI too long") => ProxyError::UriTooLong(text),
        true => ProxyError::RequestHeadTooLarge(text),
        false => ProxyError::MalformedRequest(text),
    };
    headless(state, peer, &e);
}

/// A record for a connection that sent part of a request head and not the rest within
/// `header_read_timeout` (closed without an answer): no method or target yet, but the attempt
/// and its client are logged, as for a malformed head.
pub fn head_timed_out(state: &State, peer: Peer, timeout: std::time::Duration) {
    headless(state, peer, &ProxyError::HeaderReadTimeout(timeout));
}

/// A `reject` record for a connection refused before any head was read whole.
fn headless(state: &State, peer: Peer, e: &ProxyError) {
    // A token (RFC 9110 §9.1) that no real method is.
    let method = Method::from_bytes(b"-").unwrap_or_default();
    let reason = format!("{}: {e}", e.kind()).into();
    let rec = refusal_record(state, peer, method, e, reason);
    state.finish(Box::new(rec), Instant::now());
}

/// A `reject` record with no target yet.
fn refusal_record(
    state: &State,
    peer: Peer,
    method: Method,
    e: &ProxyError,
    reason: Arc<str>,
) -> Record {
    Record {
        ts: SystemTime::now(),
        id: state.audit.next_id(),
        client: peer.addr,
        user: None,
        method,
        scheme: "none",
        host: "".into(),
        port: 0,
        path: None,
        vendor: None,
        endpoint: "none",
        rule: None,
        action: "reject",
        mode: "enforce",
        reason,
        status: e.status().as_u16(),
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.0,
        tls: "none",
        sni: None,
        key_id: None,
        model: None,
        key_ids: Vec::new(),
    }
}

/// A request hyper has read, on its way to its handler. hyper takes a half-close after a whole
/// request (`nc -N`, a script's `shutdown(SHUT_WR)`) for the client leaving, as nginx and squid
/// do: it closes the connection and drops the handler's future, and when the FIN came with
/// the request it does so before the handler first runs. Handed to the handler as its
/// argument, this writes that attempt's `client_aborted` record then, as [`AskedUnanswered`]
/// does once the handler is waiting; the handler takes the request out first thing.
pub struct Arrived(Option<ArrivedParts>);

/// What [`Arrived::open`] hands the handler.
pub struct ArrivedParts {
    pub state: Arc<State>,
    pub peer: Peer,
    /// The intercepted tunnel the request came through, if any.
    pub inside: Option<Arc<Inside>>,
    pub req: Request<hyper::body::Incoming>,
}

impl Arrived {
    pub fn new(
        state: Arc<State>,
        peer: Peer,
        inside: Option<Arc<Inside>>,
        req: Request<hyper::body::Incoming>,
    ) -> Arrived {
        Arrived(Some(ArrivedParts {
            state,
            peer,
            inside,
            req,
        }))
    }

    /// The request, to look at before it is opened.
    pub fn req_mut(&mut self) -> &mut Request<hyper::body::Incoming> {
        &mut self.0.as_mut().expect("not opened yet").req
    }

    pub fn parts(&self) -> &ArrivedParts {
        self.0.as_ref().expect("not opened yet")
    }

    /// The handler has started: from here its own guards answer for the request. (Opened
    /// where the request is used, so it moves once.)
    pub fn open(mut self) -> ArrivedParts {
        self.0.take().expect("opened once")
    }
}

impl Drop for Arrived {
    fn drop(&mut self) {
        // A PAC file fetch is no request through the proxy, and has no record when served.
        if let Some(p) = self.0.take().filter(|p| !is_pac_fetch(&p.req)) {
            let e = ProxyError::ClientAborted;
            let inside = p.inside.as_deref();
            rejected(
                &p.state,
                p.peer,
                inside,
                (&p.req).into(),
                &e,
                Instant::now(),
            );
        }
    }
}

/// The client may go away while its request waits with no answer (a login, an origin's
/// connect or answer): the handler's future is then dropped mid-wait. Armed, these finish the
/// attempt's record as `client_aborted` when that happens; `disarm` once the wait is over.
///
/// Before a decision: a record of what was asked.
pub struct AskedUnanswered<'a> {
    state: &'a State,
    peer: Peer,
    inside: Option<&'a Inside>,
    asked: Option<Asked<'a>>,
    start: Instant,
}

impl<'a> AskedUnanswered<'a> {
    pub fn arm(
        state: &'a State,
        peer: Peer,
        inside: Option<&'a Inside>,
        asked: Asked<'a>,
        start: Instant,
    ) -> Self {
        AskedUnanswered {
            state,
            peer,
            inside,
            asked: Some(asked),
            start,
        }
    }

    pub fn disarm(mut self) {
        self.asked = None;
    }
}

impl Drop for AskedUnanswered<'_> {
    fn drop(&mut self) {
        if let Some(asked) = self.asked.take() {
            let e = ProxyError::ClientAborted;
            rejected(self.state, self.peer, self.inside, asked, &e, self.start);
        }
    }
}

/// After a decision: its record, with what was uploaded so far when there is an upload.
pub struct Unanswered<'a> {
    state: &'a State,
    rec: Option<Box<Record>>,
    start: Instant,
    uploaded: Option<&'a super::body::Upload>,
}

impl<'a> Unanswered<'a> {
    pub fn arm(
        state: &'a State,
        rec: Box<Record>,
        start: Instant,
        uploaded: Option<&'a super::body::Upload>,
    ) -> Self {
        Unanswered {
            state,
            rec: Some(rec),
            start,
            uploaded,
        }
    }

    pub fn disarm(mut self) -> Box<Record> {
        self.rec.take().expect("taken once")
    }
}

/// Why an exchange was let go of before its answer ended, as its record's reason: the proxy's
/// own shutdown (`shutdown_grace` over, connections closed), else the client. `what`: what
/// was cut short, for the text.
pub fn cut_reason(state: &State, what: &str) -> Arc<str> {
    match state.shutdown.phase() {
        super::shutdown::Phase::Stopping => {
            format!("shutdown: shutdown_grace ran out before {what}").into()
        }
        _ => format!(
            "{}: the client connection closed before {what}",
            ProxyError::ClientAborted.kind()
        )
        .into(),
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.status = ProxyError::ClientAborted.status().as_u16();
            rec.reason = cut_reason(self.state, "the answer");
            if let Some(u) = self.uploaded {
                rec.bytes_out = u.sent();
            }
            self.state.finish(rec, self.start);
        }
    }
}
