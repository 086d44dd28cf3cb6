//! Audit records made on the request path: one for a decision (filled in as the exchange
//! ends), and the `reject` records for requests refused before any decision.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Method, Uri};

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
    })
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
        scheme: uri
            .scheme_str()
            .map_or("none", |s| if s == "https" { "https" } else { "http" }),
        host: uri.host().unwrap_or("").into(),
        port: uri.port_u16().unwrap_or(0),
        path: uri.path_and_query().map(|p| redact_path(p.as_str())),
        ..refusal_record(state, peer, method.clone(), e, e.kind().into())
    };
    state.finish(Box::new(rec), start);
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
    // A token (RFC 9110 §9.1) that no real method is.
    let method = Method::from_bytes(b"-").unwrap_or_default();
    let reason = format!("{}: {e}", e.kind()).into();
    let rec = refusal_record(state, peer, method, &e, reason);
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
    }
}
