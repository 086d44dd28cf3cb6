//! One request: identify, normalise the target, decide, then block or forward, and account for
//! it. CONNECT is handed to [`super::connect`]; everything else is absolute-form HTTP.

use std::convert::Infallible;
use std::error::Error as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use super::body::{Counted, OriginBody, Pending, ProxyBody, RequestBody, Upload, UpstreamHold};
use super::head_wait::{Busy, Held};
use super::hop_by_hop::{append_via, strip_hop_by_hop};
use super::inspect::Inspected;
use super::intercept::Inside;
use super::limit::{self, ByteMeter, Refused};
use super::overrides::{named_overrides, MAX_READINGS};
use super::records::{
    is_pac_fetch, record, rejected, Arrived, ArrivedParts, Asked, AskedUnanswered, Seen, Unanswered,
};
use super::{respond, Peer, State};
use crate::audit::Record;
use crate::error::ProxyError;
use crate::identity::htpasswd::parse_basic;
use crate::identity::ProxyUser;
use crate::limits::{KeyValues, Permit};
use crate::policy::{self, target, Action, BodyFacts, Decision, Mode, Policy, Scheme, Target};

/// The service function behind every client connection.
pub async fn handle(
    mut arrived: Arrived,
    busy: Busy,
) -> Result<Response<Held<ProxyBody>>, Infallible> {
    let req = arrived.req_mut();
    if !http_body::Body::is_end_stream(req.body()) {
        // The upload keeps the connection busy too, until it ends (`forward` hands it on).
        req.extensions_mut().insert(busy.clone());
    }
    let answer = if req.method() == Method::CONNECT {
        super::connect::handle(arrived).await
    } else if is_pac_fetch(req) {
        // Browsers and OS settings fetch the auto-config file before they use any proxy:
        // serve it where clients can reach, not only on the admin listener (which a
        // NetworkPolicy or firewall rightly keeps to the monitoring network). Nothing is
        // forwarded.
        let ArrivedParts { state, req, .. } = arrived.open();
        crate::admin::pac_file(&state, &req).map(ProxyBody::Left)
    } else {
        forward(arrived, None).await
    };
    // The connection awaits no head until hyper is done with this answer.
    Ok(answer.map(|body| Held::new(body, busy)))
}

/// A decided request the policy lets through, with what it holds while it runs.
pub struct Admitted {
    pub rec: Box<Record>,
    pub permits: Vec<Permit>,
    pub meter: Option<ByteMeter>,
}

/// Whom limits are counted for.
#[derive(Clone, Copy)]
pub struct Who<'a> {
    pub peer: Peer,
    pub user: Option<&'a str>,
    /// With several API keys in one request, each one's fingerprint (else empty).
    pub keys: &'a [String],
}

/// Enforces a decision: 403 when blocked, 429 when over a limit (each audited here), else the
/// request goes on with its limit permits and byte meter. Shared by requests and CONNECTs.
pub async fn admit(
    state: &State,
    d: &Decision<'_>,
    mut rec: Box<Record>,
    who: Who<'_>,
    html: bool,
    start: Instant,
) -> Result<Admitted, Response<ProxyBody>> {
    if d.enforced() == Action::Block {
        rec.status = 403;
        state.finish(rec, start);
        return Err(respond::blocked(d, html));
    }
    if d.rule.is_none() || d.action != Action::Limit {
        return Ok(Admitted {
            rec,
            permits: Vec::new(),
            meter: None,
        });
    }
    // Boxed: the limiter's future (the Redis round trip) is ~2 KiB, and held inline it would
    // be built and moved on every request, limited or not.
    match Box::pin(apply_limits(state, d, &mut rec, who)).await {
        Ok((permits, meter)) => Ok(Admitted {
            rec,
            permits,
            meter,
        }),
        Err(refused) => {
            rec.status = if refused.store_unavailable { 503 } else { 429 };
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
    who: Who<'_>,
) -> Result<(Vec<Permit>, Option<ByteMeter>), Refused> {
    let Who { peer, user, keys } = who;
    let Some(rule) = d.rule.filter(|_| d.action == Action::Limit) else {
        return Ok((Vec::new(), None));
    };
    // Several keys in one request: the first is charged as usual, then every other one's
    // `by = "key"` budget too, so a junk second key buys no second budget.
    let kv = KeyValues {
        client: peer.addr.ip(),
        user,
        key_id: keys.first().map(String::as_str).or(rec.key_id.as_deref()),
        vendor: d.vendor_id().map(|v| &**v),
    };
    let mut result = limit::admit(&state.limiter, rule, &kv, false).await;
    for k in keys.iter().skip(1) {
        let Ok(permits) = &mut result else {
            break;
        };
        let other = KeyValues {
            key_id: Some(k),
            ..kv
        };
        match limit::admit(&state.limiter, rule, &other, true).await {
            Ok(more) => permits.extend(more),
            Err(refused) => result = Err(refused),
        }
    }
    match result {
        Ok(permits) => {
            // Within its limits the request is simply allowed; "limit" means refused.
            if d.mode == Mode::Enforce {
                rec.action = Action::Allow.as_str();
            }
            let more = keys.get(1..).unwrap_or_default();
            Ok((
                permits,
                ByteMeter::for_rule(&state.limiter, rule, &kv, more),
            ))
        }
        Err(refused) if refused.store_unavailable => {
            // Not the client's doing: `portcullis_limit_store_errors_total` counts these, and
            // the rate-limited series (and its alert) stay about clients over their limits.
            rec.reason = format!(
                "limit_store_unavailable: {} cannot be checked and on_store_error = \"deny\"; {}",
                refused.limit, rule.reason
            )
            .into();
            if d.mode == Mode::Shadow {
                return Ok((Vec::new(), None));
            }
            Err(refused)
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
    client: std::net::IpAddr,
    headers: &HeaderMap,
) -> Result<Option<ProxyUser>, ProxyError> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    let Some(presented) = headers.get(header::PROXY_AUTHORIZATION) else {
        return match auth.required {
            true => Err(ProxyError::AuthRequired),
            false => Ok(None),
        };
    };
    if let Some((user, password)) = parse_basic(presented) {
        let users = auth.htpasswd.load_full();
        if let Some(proof) = users.login(client, &user, &password).await {
            return Ok(Some(ProxyUser::new(user, proof)));
        }
    }
    // Credentials that do not log in are refused even where anonymous use is allowed: passed
    // as anonymous, a mistyped password would go unnoticed and a user's traffic would be
    // attributed to no one.
    Err(ProxyError::AuthRequired)
}

/// Whether a user who authenticated earlier (a tunnel's) is still in the user file with the
/// password they proved. "A user removed is refused from the next request on" holds for the
/// requests inside a tunnel too.
pub fn still_authorised(state: &State, user: &ProxyUser) -> bool {
    state
        .auth
        .as_ref()
        .is_none_or(|a| user.still_in(&a.htpasswd.load()))
}

/// A request inside an intercepted tunnel: the same path as plain HTTP, scheme https.
pub async fn inner(arrived: Arrived) -> Result<Response<ProxyBody>, Infallible> {
    let ArrivedParts {
        state,
        peer,
        inside,
        ..
    } = arrived.parts();
    if let Some(inside) = inside {
        inside.requests.fetch_add(1, Ordering::Relaxed);
    }
    let slot = match state.inner_streams.acquire(peer.addr.ip()) {
        Ok(slot) => slot,
        Err(_) => {
            let ArrivedParts {
                state,
                peer,
                inside,
                req,
            } = arrived.open();
            let e = ProxyError::TooManyStreams(state.settings.proxy.max_connections_per_client);
            let inside = inside.as_deref();
            rejected(&state, peer, inside, (&req).into(), &e, Instant::now());
            let html = respond::wants_html(req.headers());
            return Ok(respond::error(&e, None, html));
        }
    };
    Ok(forward(arrived, slot).await)
}

/// The target of a request: from its absolute URI, or (intercepted) the tunnel's, after
/// checking the request names that same host.
fn target_of(req: &Request<Incoming>, inside: Option<&Inside>) -> Result<Target, ProxyError> {
    let Some(inside) = inside else {
        return target::from_uri(req.uri()).map_err(|e| {
            if req.uri().scheme().is_none() {
                ProxyError::NotProxyRequest
            } else {
                ProxyError::Target(e)
            }
        });
    };
    if req.method() == Method::CONNECT {
        return Err(ProxyError::Misdirected(
            "CONNECT inside an intercepted tunnel".into(),
        ));
    }
    // `OPTIONS *` asks about a server, not a resource: there is no path to decide, and it
    // is not sent on as an origin's failure either.
    if req.uri().path() == "*" {
        return Err(ProxyError::Target(target::TargetError::NotAbsolute));
    }
    // HTTP/2 carries :authority in the URI; HTTP/1.1 origin-form carries Host.
    let named = match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    if let Some(named) = named {
        let (host, port) = target::split_host_port(named)?;
        if host != inside.host || port.is_some_and(|p| p != inside.port) {
            return Err(ProxyError::Misdirected(format!(
                "request names {named:?} inside a tunnel to {}:{}",
                inside.host, inside.port
            )));
        }
    }
    Ok(Target {
        scheme: Scheme::Https,
        host: inside.host.clone(),
        port: inside.port,
    })
}

async fn forward(
    arrived: Arrived,
    stream_slot: Option<super::per_client::ClientSlot>,
) -> Response<ProxyBody> {
    let ArrivedParts {
        state,
        peer,
        inside,
        mut req,
    } = arrived.open();
    let inside = inside.as_ref();
    let start = Instant::now();
    let html = respond::wants_html(req.headers());
    let realm = state.auth.as_ref().map(|a| a.realm.as_str());
    let tls = if inside.is_some() {
        "intercept"
    } else {
        "none"
    };
    // Fail closed when the audit log cannot take records (`on_full = "block"`).
    if let Err(e) = state.audit_admits() {
        return respond::error(&e, realm, html);
    }
    // Asked before the target is read (`ws://` is decided as `http://`) and before `Upgrade`
    // is stripped as hop-by-hop.
    let websocket = super::upgrade::Websocket::asked(&mut req);
    // Before the policy is read, so that a reload during the handshake is seen (see `Recheck`).
    let swaps = websocket.as_ref().map(|_| state.policy_swapped.subscribe());

    let target = match target_of(&req, inside.map(|i| &**i)) {
        Ok(t) => t,
        Err(e) => {
            rejected(&state, peer, inside.map(|i| &**i), (&req).into(), &e, start);
            return respond::error(&e, realm, html);
        }
    };
    if let Err(e) = framing(&req, state.settings.proxy.max_header_bytes) {
        rejected(&state, peer, inside.map(|i| &**i), (&req).into(), &e, start);
        return respond::error(&e, realm, html);
    }
    // The slow paths (a bcrypt check, reading a body prefix) are boxed so that the request
    // future, built and moved on every request, stays small when they do not run.
    let login = match inside.map(|i| &i.user) {
        // Proven on the CONNECT; the user file may have changed since.
        Some(Some(u)) if !still_authorised(&state, u) => {
            let e = ProxyError::AuthRequired;
            rejected(&state, peer, inside.map(|i| &**i), (&req).into(), &e, start);
            let mut resp = respond::error(&e, realm, html);
            // The tunnel's login is what failed: an HTTP/1.1 client closes it and its next
            // CONNECT is asked for credentials.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        Some(u) => u.clone(),
        None if state.auth.is_none() => None,
        None => {
            // A login can take a while (bcrypt): a client gone meanwhile is still recorded.
            let waiting =
                AskedUnanswered::arm(&state, peer, inside.map(|i| &**i), (&req).into(), start);
            let login = Box::pin(authenticate(&state, peer.addr.ip(), req.headers())).await;
            waiting.disarm();
            match login {
                Ok(u) => u,
                Err(e) => {
                    rejected(&state, peer, inside.map(|i| &**i), (&req).into(), &e, start);
                    return respond::error(&e, realm, html);
                }
            }
        }
    };
    let user = login.as_ref().map(ProxyUser::name);

    let policy = state.policy.load_full();
    let (mut parts, body) = req.into_parts();
    // What the policy reads (keys, tenant headers, the body's encoding) must be what the origin
    // gets: a header the client names in `Connection` is dropped before anything looks at it,
    // or naming `OpenAI-Organization` there would pass the tenant check and then vanish.
    strip_hop_by_hop(&mut parts.headers);
    // Taken out so the path can be borrowed while the parts change; the upstream request gets
    // its own URI below.
    let uri_in = std::mem::take(&mut parts.uri);
    let sent = uri_in.path_and_query().map_or("/", |p| p.as_str());
    // `http://host?q` has an empty path, which is `/` (RFC 9112 §3.2.1): decided, logged and
    // forwarded as `/?q`, or a rule on `/` would miss it.
    let rooted;
    let path_q = match sent.starts_with('?') {
        true => {
            rooted = format!("/{sent}");
            rooted.as_str()
        }
        false => sent,
    };
    let keys = state.keys.from_request(&parts.headers, uri_in.query());

    // What a refusal from here on records the request asked for.
    let asked_of = || Asked {
        method: &parts.method,
        uri: &uri_in,
        headers: &parts.headers,
    };

    // Some front ends (Google's) and many frameworks act on a method-override header instead
    // of the request line: a rule on `DELETE` must see a `POST` that says it is one.
    // IIS and Symfony route on `X-Original-URL` / `X-Rewrite-URL` instead of the request
    // line, and Rails, Laravel and Express's method-override read a `_method` parameter.
    let query = path_q.split_once('?').map(|(_, q)| q);
    let Ok(named) = named_overrides(&parts.headers, query) else {
        let e = ProxyError::MalformedRequest(format!(
            "more than {MAX_READINGS} other methods and paths named by override fields and parameters"
        ));
        rejected(&state, peer, inside.map(|i| &**i), asked_of(), &e, start);
        return respond::error(&e, realm, html);
    };
    // Body rules need the body before the decision; only read it when one could apply:
    // to this vendor at all, then to this request on any of its readings.
    let bodiless = policy::Request {
        client: peer.addr.ip(),
        user,
        method: &parts.method,
        host: &target.host,
        port: target.port,
        path: Some(path_q),
        body: BodyFacts::default(),
    };
    let wants_body = policy
        .inspection
        .as_ref()
        .filter(|ins| ins.wanted(policy.catalog.lookup(&target.host).map(|h| h.vendor)))
        .filter(|_| {
            policy.body_could_decide(&bodiless)
                || named.iter().any(|(method, path)| {
                    policy.body_could_decide(&policy::Request {
                        method: method.as_ref().unwrap_or(&parts.method),
                        path: path.or(bodiless.path),
                        ..bodiless
                    })
                })
        });
    // Boxed: most requests inspect nothing, and an empty `Option<Inspected>` would still be
    // moved whole through the request's future.
    let (inspected, body) = match wants_body {
        Some(ins) => match Box::pin(super::inspect::inspect(
            ins,
            peer.addr.ip(),
            &parts.headers,
            &model_fields(&policy, &target.host, path_q, &named),
            body,
        ))
        .await
        {
            Ok((mut i, b)) => {
                i.adopt_query_model(path_q);
                (Some(Box::new(i)), b)
            }
            Err(e) => {
                rejected(&state, peer, inside.map(|i| &**i), asked_of(), &e, start);
                return respond::error(&e, realm, html);
            }
        },
        None => (None, RequestBody::streamed(body)),
    };
    let facts = inspected
        .as_ref()
        .map_or_else(BodyFacts::default, |i| BodyFacts {
            model: i.model.as_deref(),
            dlp: i.dlp.0,
        });
    let asked = policy::Request {
        body: facts,
        ..bodiless
    };
    let mut d = policy.decide(&asked);
    // A body naming several models (a batch's requests) is decided on each: any one blocked
    // blocks it.
    for (m, _) in inspected.iter().flat_map(|i| &i.more_models) {
        let other = policy::Request {
            body: BodyFacts {
                model: Some(m),
                ..facts
            },
            ..asked
        };
        d = d.merge_models(policy.decide(&other));
    }
    // A reload decides an open WebSocket again on what decided its handshake: the other
    // readings and the account fields too, as sent (before a rule's `set_headers`).
    let ws_facts = websocket.as_ref().map(|_| super::upgrade::Asked {
        readings: named
            .iter()
            .map(|(m, p)| (m.clone(), p.map(Box::from)))
            .collect(),
        orgs: org_values(&parts.headers).map(Box::from).collect(),
        key_id: keys.id.as_deref().map(Box::from),
        // Read from the query even when no rule made the handshake's model matter: a rule
        // on it added at a reload must close the WebSocket.
        model: facts
            .model
            .map(Box::from)
            .or_else(|| super::inspect::query_model(path_q).map(Into::into)),
    });
    let mut overridden = false;
    for (method, path) in named {
        overridden = true;
        if method.as_ref().is_some_and(|m| *m == parts.method) {
            continue;
        }
        let other = policy::Request {
            method: method.as_ref().unwrap_or(&parts.method),
            path: path.or(asked.path),
            ..asked
        };
        d = d.merge(policy.decide(&other));
    }
    let seen = Seen {
        peer,
        user,
        method: &parts.method,
        scheme: target.scheme.as_str(),
        host: &target.host,
        port: target.port,
        path: Some(path_q),
        tls,
    };
    let mut rec = record(&seen, &d, 0, keys.id);
    rec.key_ids = keys.each.iter().map(|k| k.as_str().into()).collect();
    rec.id = state.audit.next_id();
    if let Some(i) = inside {
        rec.sni = i.sni.clone();
    }
    if let Some(i) = &inspected {
        rec.model = match (i.model_is_secret, i.more_models.is_empty()) {
            (true, true) => Some("[redacted]".into()),
            (false, true) => i.model.as_deref().map(Into::into),
            // Listed with commas; a comma inside a name is written `%2C`, so the list reads
            // one way. Only a secret one is hidden: the others still say what the batch ran.
            (_, false) => Some(
                i.model
                    .iter()
                    .map(|m| (m, i.model_is_secret))
                    .chain(i.more_models.iter().map(|(m, s)| (m, *s)))
                    .map(|(m, secret)| match secret {
                        true => "[redacted]".into(),
                        false => m.replace(',', "%2C"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
                    .into(),
            ),
        };
        note_inspection(&policy, i, &d, &mut rec, path_q, overridden);
    }
    // A model the path names is the one rules read (and it is in the path anyway). Asked only
    // of the vendors whose paths name one: the decision already found the vendor.
    let names_models = d.vendor.is_some_and(|v| v.names_models());
    if let Some(m) = names_models
        .then(|| policy.path_model(&target.host, path_q))
        .flatten()
    {
        rec.model = Some(match crate::audit::looks_like_key(&m) {
            true => "[redacted]".into(),
            false => m.into(),
        });
    }

    // Tenant restriction and uninspectable bodies refuse what the rule would let through.
    if d.enforced() != Action::Block {
        let why = match keys.too_many {
            true => Some(format!(
                "too_many_keys: more than {} different API keys in one request",
                crate::identity::keys::MAX_KEYS
            )),
            false => refusal(&d, &rec, &parts.headers, inspected.as_deref()),
        };
        if let Some(why) = why {
            rec.action = Action::Block.as_str();
            rec.status = 403;
            rec.reason = why.clone().into();
            state.finish(rec, start);
            return respond::blocked_because(&d, &why, html);
        }
    }

    let who = Who {
        peer,
        user,
        keys: &keys.each,
    };
    let Admitted {
        mut rec,
        permits,
        meter,
    } = match admit(&state, &d, rec, who, html, start).await {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };

    let authority = target.authority();
    // An absolute URI already in normal form (the usual case) is forwarded as it came.
    let unchanged = uri_in.scheme_str() == Some(target.scheme.as_str())
        && uri_in.authority().map(|a| a.as_str()) == Some(authority.as_str());
    let respelled = match unchanged {
        true => None,
        false => Some(Uri::try_from(format!(
            "{}://{authority}{path_q}",
            target.scheme.as_str()
        ))),
    };
    let respelled = match respelled.transpose() {
        Ok(u) => u,
        Err(_) => {
            let e = ProxyError::Target(target::TargetError::InvalidHost("unrepresentable"));
            rec.status = 400;
            rec.reason = e.kind().into();
            state.finish(rec, start);
            return respond::error(&e, realm, html);
        }
    };
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    append_via(&mut parts.headers);
    if d.enforced() != Action::Block {
        for rule in d.restricting_rules() {
            for (name, value) in &rule.set_headers {
                parts.headers.insert(name.clone(), value.clone());
            }
        }
    }
    // The pools speak HTTP/1.1 or HTTP/2 upstream, whatever the client spoke to us.
    parts.version = Version::HTTP_11;
    // hyper sends a GET or HEAD body of unknown length (a chunked one) only when told to frame
    // it: left to itself it would send the head alone and the origin would never see the body.
    if matches!(parts.method, Method::GET | Method::HEAD)
        && !http_body::Body::is_end_stream(&body)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let uploaded = Arc::new(super::body::Upload::default());
    let body = Counted::shared(body, uploaded.clone())
        .idle_timeout(state.settings.proxy.body_timeout)
        .holding(parts.extensions.remove::<Busy>());

    let timeout = state.settings.upstream.response_timeout;
    let method_was_head = parts.method == Method::HEAD;
    // From here the origin may have the request: if this future is dropped before the answer
    // (the client hung up, its stream was reset, shutdown cut it), the guard writes the record.
    let in_flight = Unanswered::arm(&state, rec, start, Some(&uploaded));
    // What a reload decides an open WebSocket on again (built only for a handshake).
    // Boxed: held across the exchange's awaits, and rare.
    let recheck = swaps.map(|swaps| {
        Box::new(super::upgrade::Recheck {
            client: peer.addr.ip(),
            login: login.clone(),
            host: target.host.clone(),
            port: target.port,
            path: path_q.into(),
            asked: ws_facts.unwrap_or_default(),
            tunnel_port: inside.map(|i| i.port),
            swaps,
        })
    });
    let result = match (websocket, target.scheme) {
        (Some(ws), _) => {
            drop(body);
            let uri = respelled.as_ref().unwrap_or(&uri_in);
            // Boxed: rare, and large beside the request future moved on every request.
            Box::pin(ws.handshake(&state, &target, parts, uri, timeout)).await
        }
        (None, Scheme::Http) => {
            // One HTTP/1.1 hop to the origin: origin-form.
            parts.uri = match respelled.as_ref().unwrap_or(&uri_in).path_and_query() {
                Some(pq) => Uri::from(pq.clone()),
                None => Uri::from_static("/"),
            };
            if http_body::Body::is_end_stream(&body) {
                // Nothing to upload: the exchange runs on this task. (Dropping the empty body
                // ends the upload for the record.)
                drop(body);
                let sent = state
                    .direct
                    .send(authority, &target.host, target.port, &parts, timeout);
                match sent.await {
                    Err(e) => Err(e),
                    Ok(resp) => Ok((resp.map(Either::Right), None)),
                }
            } else {
                let upstream_req = Request::from_parts(parts, body);
                let sent = state
                    .h1
                    .send(authority, &target.host, target.port, upstream_req);
                // Boxed, as the intercepted send below: inline, these two awaits sized the
                // request future (4,816 bytes, now 3,400), and with it the in-flight slot
                // every client connection holds, bodiless requests' too.
                match Box::pin(answered(&uploaded, timeout, sent)).await {
                    None => Err(ProxyError::ResponseTimeout),
                    Some(Err(e)) => Err(e),
                    Some(Ok((resp, lease))) => {
                        Ok((resp.map(Either::Left), Some(UpstreamHold::Pooled(lease))))
                    }
                }
            }
        }
        (None, Scheme::Https) => {
            parts.uri = respelled.unwrap_or(uri_in);
            // The URI's authority is the `Host` set above: hyper-util writes it back as `Host`
            // on an HTTP/1.1 connection, and HTTP/2 sends it as `:authority`, where a `Host`
            // beside it is a duplicate that origins may refuse (nginx answers 400).
            parts.headers.remove(header::HOST);
            let upstream_req = Request::from_parts(parts, body);
            let sent = async {
                match inside {
                    None => state.client.request(upstream_req).await.map(|r| (r, None)),
                    // Boxed: it may queue for a connection slot, and is large beside the
                    // request future moved on every request.
                    Some(i) => Box::pin(i.upstream.send(upstream_req)).await,
                }
            };
            match Box::pin(answered(&uploaded, timeout, sent)).await {
                None => Err(ProxyError::ResponseTimeout),
                Some(Err(e)) => Err(upstream_error(&e)),
                Some(Ok((resp, slot))) => {
                    Ok((resp.map(Either::Left), slot.map(UpstreamHold::TunnelSlot)))
                }
            }
        }
    };
    let mut rec = in_flight.disarm();
    // Taken out of the `Result` once: the answer is large, and every `match` that rebuilt
    // the `Result` around it was another copy of it per request.
    let e = match result {
        Ok((mut resp, lease)) => {
            if let Some(recheck) = recheck.filter(|_| super::upgrade::switched(&resp)) {
                let open = super::upgrade::Open {
                    state,
                    rec,
                    start,
                    permits,
                    meter,
                    stream_slot,
                    recheck,
                };
                return super::upgrade::relay(resp, open);
            }
            match unrelayable(&mut resp) {
                // Dropping the lease closes the connection: what follows on it cannot be
                // framed.
                Some(e) => e,
                None => {
                    let pending = Pending {
                        state,
                        record: rec,
                        start,
                        uploaded,
                        permits,
                        stream_slot,
                        meter,
                        lease,
                    };
                    return relayed(resp, pending, method_was_head);
                }
            }
        }
        Err(e) => e,
    };
    super::records::failed(&state, &mut rec, &e);
    rec.bytes_out = uploaded.sent();
    state.finish(rec, start);
    respond::error(&e, realm, html)
}

/// The origin's answer on its way to the client, its record finished when its body ends.
fn relayed(
    resp: Response<OriginBody>,
    mut pending: Pending,
    method_was_head: bool,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    if http_body::Body::is_end_stream(&body) {
        // No body to wait for (HEAD, 204, 304, Content-Length: 0).
        if let Some(l) = pending.lease.take() {
            l.release();
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    append_via(&mut parts.headers);
    pending.record.status = parts.status.as_u16();
    let announced = match (method_was_head, parts.status.as_u16()) {
        (true, _) | (_, 100..=199 | 204 | 304) => Some(0),
        // Only an HTTP/2 body may be whole without having said so (see `Counted`).
        _ if parts.version != Version::HTTP_2 => None,
        _ => parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
    };
    Response::from_parts(
        parts,
        Either::Right(Counted::finishing(body, pending, announced)),
    )
}

/// The origin's answer, or `None` once it is late ([`Upload::answer_late`]): the response
/// timeout counts from the end of the upload, not from the request's start.
async fn answered<F: std::future::Future>(
    upload: &Upload,
    timeout: std::time::Duration,
    answer: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        r = answer => Some(r),
        () = upload.answer_late(timeout) => None,
    }
}

/// A response head that cannot be passed on as it is:
/// - a transfer coding besides `chunked` (`gzip`): hyper takes off only the chunked framing, and
///   removing the field as hop-by-hop would hand the client compressed bytes labelled as plain.
///   Requests get a 501 for the same; a response gets a 502;
/// - `101 Switching Protocols` to a request that did not ask for a WebSocket: the proxy forwards
///   no other `Upgrade`, so it never asked for one;
/// - a head over the size limit that hyper's client let through (see
///   [`crate::upstream::head_too_large`]; the direct exchange checks its own as it parses).
///
/// A chunked head passes with its `Content-Length` (RFC 9112 §6.3: ignored beside chunked)
/// removed: it would frame the decoded body wrongly for the client.
fn unrelayable(resp: &mut Response<OriginBody>) -> Option<ProxyError> {
    if matches!(resp.body(), Either::Left(_)) && crate::upstream::head_too_large(resp) {
        return Some(ProxyError::ResponseHeadTooLarge);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Some(ProxyError::Upstream(
            "the origin switched protocols unasked (upgrades are not forwarded)".into(),
        ));
    }
    let mut codings = resp.headers().get_all(header::TRANSFER_ENCODING).iter();
    let first = codings.next()?;
    let other = std::iter::once(first)
        .chain(codings)
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"));
    if let Some(coding) = other {
        return Some(ProxyError::Upstream(format!(
            "the origin's transfer coding {:?} is not supported; only chunked",
            String::from_utf8_lossy(coding)
        )));
    }
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    None
}

/// Where this request's body names models deeper than its top-level `model`: the fields of
/// its path, and of each path an override field names (an origin routing on `X-Original-URL:
/// /v1/files` reads a batch file there).
fn model_fields<'p>(
    policy: &'p Policy,
    host: &policy::Host,
    path_q: &str,
    named: &[(Option<Method>, Option<&str>)],
) -> Vec<&'p crate::inspect::model::FieldPath> {
    let mut fields = policy.model_fields(host, path_q);
    for path in named.iter().filter_map(|(_, p)| *p) {
        for f in policy.model_fields(host, path) {
            if !fields.iter().any(|x| std::ptr::eq(*x, f)) {
                fields.push(f);
            }
        }
    }
    fields
}

/// Puts what inspection found into the record: pattern names (never the matched text), and
/// that only the first part of a longer body was inspected. Then, with the decision known,
/// whether what inspection could not read must refuse the request (see [`refusal`]).
fn note_inspection(
    policy: &Policy,
    i: &Inspected,
    d: &Decision<'_>,
    rec: &mut Record,
    path_q: &str,
    overridden: bool,
) {
    let Some(ins) = &policy.inspection else {
        return;
    };
    if i.dlp.0 != 0 || i.partial {
        let mut reason = d.reason.to_string();
        if i.dlp.0 != 0 {
            let names: Vec<&str> = ins.scanner.names(i.dlp).collect();
            reason = format!("{reason}; dlp: {}", names.join(","));
        }
        if i.partial {
            reason = format!("{reason}; inspected first {} bytes only", i.seen);
        }
        rec.reason = reason.into();
    }
    if let Some(why) = i.unverifiable(policy, d, rec, path_q, overridden) {
        let _ = i.refused.set(why);
    }
}

/// Why a request the policy lets through must still be refused: a rule's tenant restriction
/// it does not meet, or a body DLP rules should see but cannot (a content coding), or one
/// that model or DLP rules in play cannot vouch for (see `Inspected::unverifiable`).
fn refusal(
    d: &Decision<'_>,
    rec: &Record,
    headers: &HeaderMap,
    inspected: Option<&Inspected>,
) -> Option<String> {
    if let Some(enc) = inspected.and_then(|i| i.encoded.as_deref()) {
        return Some(format!(
            "body_not_inspectable: content-encoding {enc:?} hides the body from the model and DLP rules that read it"
        ));
    }
    if let Some(why) = inspected.and_then(|i| i.refused.get()) {
        return Some(why.clone());
    }
    d.restricting_rules()
        .find_map(|rule| tenant_refusal(rule, rec.key_id.as_deref(), org_values(headers)))
}

/// The account fields a `require_orgs` restriction reads, each value trimmed.
pub(super) fn org_values(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    ["openai-organization", "openai-project"]
        .into_iter()
        .flat_map(|h| headers.get_all(h))
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
}

/// Why `rule`'s tenant restriction refuses a request made with the key `key_id` and naming the
/// accounts `orgs` (see [`org_values`]), if it does.
pub(super) fn tenant_refusal<'o>(
    rule: &crate::policy::Rule,
    key_id: Option<&str>,
    mut orgs: impl Iterator<Item = &'o str>,
) -> Option<String> {
    if !rule.require_keys.is_empty() {
        let ok = key_id.is_some_and(|k| rule.require_keys.iter().any(|x| **x == *k));
        if !ok {
            return Some(format!(
                "key_not_allowed: rule {} admits only the organisation's API keys (key_id {})",
                rule.id,
                key_id.unwrap_or("none")
            ));
        }
    }
    if !rule.require_orgs.is_empty() {
        let first = orgs.next();
        // Every organisation header present must be allowed, and at least one present.
        let ok = first.is_some_and(|f| {
            std::iter::once(f)
                .chain(orgs)
                .all(|o| rule.require_orgs.iter().any(|x| **x == *o))
        });
        if !ok {
            return Some(format!(
                "org_not_allowed: rule {} admits only the organisation's accounts",
                rule.id
            ));
        }
    }
    None
}

/// What hyper's parser lets through but a proxy must not forward as is: two Host fields
/// (RFC 9112 §3.2: 400), and transfer codings other than chunked, which we would strip (the
/// field is hop-by-hop) without decoding, changing the content (RFC 9112 §6.1: 501).
fn framing(req: &Request<Incoming>, max_head: usize) -> Result<(), ProxyError> {
    let headers = req.headers();
    // hyper bounds its read buffer, which a head arriving in one read can overshoot: the
    // limit is on the head itself (request line and fields, as on the wire).
    let uri = req.uri();
    let line = req.method().as_str().len()
        + uri.authority().map_or(0, |a| a.as_str().len() + 8)
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if line + fields > max_head {
        return Err(ProxyError::RequestHeadTooLarge(format!(
            "{} bytes, over max_header_bytes {max_head}",
            line + fields
        )));
    }
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
