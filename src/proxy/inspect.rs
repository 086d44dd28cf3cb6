//! Holding back the first part of a request body so DLP and `model` rules can see it before
//! the decision; the held frames are then replayed upstream ahead of the rest of the body.
//! Once the decision is known, [`Inspected::unverifiable`] says whether what could not be
//! read matters to it: a body only partly read, in another encoding, or naming its model in
//! two places is refused when a rule reading it could have decided otherwise.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use std::net::IpAddr;

use super::budget::Held;

use super::body::RequestBody;
use crate::audit::Record;
use crate::error::ProxyError;
use crate::inspect::{self, dlp::Hits, model};
use crate::policy::path::{self, Segments};
use crate::policy::{
    Action, Decision, Endpoint, Facts, Host, HostPattern, Inspection, Mode, Policy, Rule,
};

/// What the held-back prefix showed.
#[derive(Debug, Default)]
pub struct Inspected {
    /// The body's `model` (the JSON body's top-level one, or a form's field), lowercased; the
    /// first of them where the body names several (`model_fields`: a batch's requests).
    pub model: Option<String>,
    /// The other different models such a body names, lowercased: each is decided too. With
    /// each, whether it is secret as sent (see `model_is_secret`).
    pub more_models: Vec<(String, bool)>,
    /// A DLP pattern matches the model value as sent (a key pasted there): rules still read
    /// it, the audit record does not show it.
    pub model_is_secret: bool,
    pub dlp: Hits,
    /// Bytes inspected.
    pub seen: usize,
    /// The body went on past the cap: the rest streams unread.
    pub partial: bool,
    /// A content coding (gzip, br…) we do not decode: the bytes say nothing.
    pub encoded: Option<String>,
    /// The body names its model twice, or is malformed JSON (or a malformed form): vendors'
    /// parsers differ on which `model` counts, or find one where we do not.
    pub ambiguous: bool,
    /// Why the bytes are not UTF-8 text (UTF-16 or UTF-32, NUL bytes, a declared charset):
    /// neither model nor DLP rules can read them.
    pub unreadable: Option<String>,
    /// Why the request must be refused after all, set once the decision on it is known (see
    /// [`Inspected::unverifiable`]).
    pub refused: OnceLock<String>,
}

/// What the Content-Type fields say about how the body is to be read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Declared {
    /// A charset other than UTF-8, or a field that cannot be parsed.
    unreadable: Option<String>,
    /// `application/x-www-form-urlencoded`.
    form: bool,
    /// The boundary of each `multipart/form-data` field (empty when it names none).
    multipart: Vec<Vec<u8>>,
    /// Every field names a type whose bytes are not text (a multipart form, `image/*`,
    /// `audio/*`, `video/*`, `application/octet-stream`): NUL bytes past the start are file
    /// contents, not another encoding.
    binary: bool,
}

/// Every Content-Type field counts: two fields are two readings a vendor may pick from.
fn declared(headers: &HeaderMap) -> Declared {
    let mut d = Declared::default();
    let mut fields = 0;
    let mut binary = 0;
    for v in headers.get_all(CONTENT_TYPE) {
        fields += 1;
        let Some((essence, ps)) =
            model::params(v.as_bytes()).filter(|_| model::plainly_spelled(v.as_bytes()))
        else {
            d.unreadable = Some("a Content-Type that cannot be parsed".into());
            continue;
        };
        // A byte past ASCII in the type (`multipart/form-data\u{a0}`) is white space that
        // Python's str.strip() removes and ours does not: read two ways, so not read at all.
        if !essence.is_ascii() {
            d.unreadable = Some("a Content-Type that cannot be parsed".into());
            continue;
        }
        let essence = essence.to_ascii_lowercase();
        if essence == b"application/x-www-form-urlencoded" {
            d.form = true;
        }
        // Protocol buffers, binary or as JSON arrays (Google's APIs take both, with the model
        // in the body): neither a JSON object nor a form, so a `model` is never found there.
        if essence.ends_with(b"protobuf") || essence.starts_with(b"application/grpc") {
            let shown: String = String::from_utf8_lossy(&essence).chars().take(48).collect();
            d.unreadable = Some(format!("Content-Type {shown}"));
        }
        if essence == b"multipart/form-data" {
            // One plain `boundary` or none read: with two, or an RFC 2231 `boundary*`, parsers
            // pick different ones (Werkzeug the last), and an empty one makes the body doubtful.
            let mut named = ps.iter().filter(|(n, _, _)| n.starts_with(b"boundary"));
            // Nor one with a backslash escape: `"X\yZ"` is `XyZ` to RFC 9110 and to us, and
            // stays `X\yZ` to Werkzeug and python-multipart, which frame other parts.
            let boundary = match (named.next(), named.next()) {
                (Some((n, v, false)), None) if n == b"boundary" => v.clone(),
                _ => Vec::new(),
            };
            d.multipart.push(boundary);
        }
        if essence.starts_with(b"multipart/")
            || essence.starts_with(b"image/")
            || essence.starts_with(b"audio/")
            || essence.starts_with(b"video/")
            || essence == b"application/octet-stream"
        {
            binary += 1;
        }
        if let Some((_, cs, _)) = ps
            .iter()
            .find(|(n, v, _)| n == b"charset" && !model::utf8_charset(v))
        {
            let shown: String = String::from_utf8_lossy(cs).chars().take(32).collect();
            d.unreadable = Some(format!("Content-Type charset {shown:?}"));
        }
    }
    d.binary = fields > 0 && binary == fields;
    d
}

/// Reads up to `ins.max_body` of `body` (waiting at most `ins.timeout`), inspects it, and
/// returns the body to send on: the held frames, then whatever is left.
/// `fields`: where this path's bodies name models besides the top-level `model` (the
/// vendor's `model_fields`).
pub async fn inspect(
    ins: &Inspection,
    client: IpAddr,
    headers: &HeaderMap,
    fields: &[&model::FieldPath],
    mut body: Incoming,
) -> Result<(Inspected, RequestBody), ProxyError> {
    let mut out = Inspected::default();
    // Every field and every listed coding: `identity` first and `gzip` in a second field
    // is still gzip.
    let coded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    if let Some(enc) = coded {
        out.encoded = Some(enc.chars().take(32).collect());
        return Ok((out, RequestBody::streamed(body)));
    }
    if body.is_end_stream() {
        return Ok((out, RequestBody::streamed(body)));
    }

    // One copy of the prefix, which is both scanned and sent on; the frames it came in are
    // dropped as they are copied. Content-Length (when sent) sizes it once.
    let expect = body
        .size_hint()
        .upper()
        .unwrap_or(0)
        .min(ins.max_body as u64) as usize;
    let mut prefix = BytesMut::with_capacity(expect);
    // Bytes past the prefix in its last frame, and trailers: sent after the prefix.
    let mut after: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut budget: Option<Held> = None;
    let deadline = tokio::time::Instant::now() + ins.timeout;
    let mut ended = false;
    while prefix.len() < ins.max_body {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            // A client that pauses past the wait must not get the rest past the rules
            // uninspected: deciding on "what arrived" would let a secret sent after a pause
            // through. Refused (408) instead.
            Err(_) => return Err(ProxyError::InspectionTimeout),
            Ok(None) => {
                ended = true;
                break;
            }
            Ok(Some(Err(e))) => return Err(super::stall::client_body_error(&e)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    let take = d.len().min(ins.max_body - prefix.len());
                    // Fail closed: forwarding uninspected would skip the rules.
                    if !ins.budget.take(client, take, &mut budget) {
                        return Err(ProxyError::InspectionBusy);
                    }
                    prefix.extend_from_slice(&d[..take]);
                    if take < d.len() {
                        after.push_back(Frame::data(d.slice(take..)));
                    }
                }
                Err(trailers) => after.push_back(trailers),
            },
        }
    }
    ended = ended || body.is_end_stream();
    // Bytes past the cap may already be here (the rest of the last frame) even when the body
    // has ended.
    let mut longer = after
        .iter()
        .any(|f| f.data_ref().is_some_and(|d| !d.is_empty()));
    // A body exactly `max_body` long (chunked, or HTTP/2 with its end in a frame of its own)
    // tells that it has ended only on the next read. A model rule refuses a body it cannot
    // read to the end, so it is worth that read (within the same wait): a body that goes on
    // is then known to, and one that ends is read whole. Its frame is sent on after the prefix.
    if !ended && !longer && ins.models {
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                // Not known: taken as longer.
                Err(_) => break,
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(Err(e))) => return Err(super::stall::client_body_error(&e)),
                Ok(Some(Ok(frame))) => {
                    if frame.data_ref().is_some_and(Bytes::is_empty) {
                        continue;
                    }
                    // Trailers are the last frame.
                    ended = frame.is_trailers();
                    longer = !ended;
                    after.push_back(frame);
                    break;
                }
            }
        }
    }
    out.partial = longer || !ended;
    out.seen = prefix.len();
    if ins.dlp != 0 {
        out.dlp = ins.scanner.scan(&prefix);
    }
    let declared = declared(headers);
    out.unreadable = declared
        .unreadable
        .clone()
        .or_else(|| inspect::unreadable(&prefix, declared.binary).map(Into::into));
    if ins.models {
        let complete = !out.partial;
        read_model(&mut out, &prefix, &declared, complete, &ins.scanner);
        for field in fields {
            read_nested_models(&mut out, &prefix, &declared, field, &ins.scanner);
        }
    }
    let rest = (!ended).then_some(body);
    if !prefix.is_empty() {
        after.push_front(Frame::data(prefix.freeze()));
    }
    Ok((out, RequestBody::resumed(after, budget, rest)))
}

/// The body's model, from each reading its Content-Type allows: the JSON scanner always (a
/// vendor may parse JSON whatever the type says), a form's `model` field when the type is
/// a form. Two readings that disagree are ambiguous.
fn read_model(
    out: &mut Inspected,
    prefix: &[u8],
    declared: &Declared,
    complete: bool,
    scanner: &crate::inspect::dlp::Scanner,
) {
    let secret =
        |m: &str| crate::audit::looks_like_key(m) || !scanner.scan(m.as_bytes()).is_empty();
    let json = model::model(prefix);
    out.model_is_secret = json.as_deref().is_some_and(secret);
    let mut found = json.map(|m| m.to_ascii_lowercase());
    let mut ambiguous = model::model_ambiguous(prefix);
    let forms = declared
        .form
        .then(|| model::form_model(prefix, complete))
        .into_iter()
        .chain(
            declared
                .multipart
                .iter()
                .map(|b| model::multipart_model(prefix, b, complete)),
        );
    for f in forms {
        ambiguous |= f.ambiguous;
        out.model_is_secret |= f.model.as_deref().is_some_and(secret);
        if let Some(m) = f.model.map(|m| m.to_ascii_lowercase()) {
            match &found {
                Some(other) => ambiguous |= *other != m,
                None => found = Some(m),
            }
        }
    }
    out.model = found;
    out.ambiguous = ambiguous;
}

/// The model a query string names for sure (once, readably), lowercased as rules read it.
pub fn query_model(path_q: &str) -> Option<String> {
    let (_, query) = path_q.split_once('?')?;
    let f = model::form_model(query.as_bytes(), true);
    f.model
        .filter(|_| !f.ambiguous)
        .map(|m| m.to_ascii_lowercase())
}

/// The models a body names at `field`, beside the top-level one `read_model` found: the first
/// becomes the body's model if it named none, the others are decided too.
fn read_nested_models(
    out: &mut Inspected,
    prefix: &[u8],
    declared: &Declared,
    field: &model::FieldPath,
    scanner: &crate::inspect::dlp::Scanner,
) {
    let nested = model::models_at(prefix, field, &declared.multipart);
    out.ambiguous |= nested.ambiguous;
    for m in nested.models {
        let secret = crate::audit::looks_like_key(&m) || !scanner.scan(m.as_bytes()).is_empty();
        let m = m.to_ascii_lowercase();
        match &out.model {
            None => {
                out.model = Some(m);
                out.model_is_secret = secret;
            }
            Some(first) if *first == m || out.more_models.iter().any(|(x, _)| *x == m) => {}
            Some(_) => out.more_models.push((m, secret)),
        }
    }
}

impl Inspected {
    /// A body that names no model leaves the query string's to decide on, when it names one
    /// for sure: OpenAI's Realtime WebSocket is `GET /v1/realtime?model=…`, with no body.
    /// (A query naming one model and the body another stays a doubt: see `unverifiable`.)
    pub fn adopt_query_model(&mut self, path_q: &str) {
        let body_silent = self.model.is_none()
            && !self.ambiguous
            && self.encoded.is_none()
            && self.unreadable.is_none();
        if let Some(m) = query_model(path_q).filter(|_| body_silent) {
            self.model_is_secret = crate::audit::looks_like_key(&m);
            self.model = Some(m);
        }
    }

    /// Why this request must be refused now that the policy has decided on what inspection
    /// found, if it must: something inspection could not vouch for, where a rule that reads
    /// it could have decided otherwise (see [`in_play`]). Fail closed:
    ///
    /// - a body that is not UTF-8 text, when a model or DLP rule is in play;
    /// - when a model rule is in play: a body naming its model ambiguously, a query string
    ///   naming a `model` the body does not (vendors may read either), and a body longer than
    ///   `max_body` (a second `model` past the cap is what Python and JavaScript parsers read).
    ///
    /// A partly read body where only DLP rules are in play streams on, as documented.
    ///
    /// `overridden`: the request names another method or path in a field or parameter
    /// (which some origins act on instead); see [`in_play`].
    pub fn unverifiable(
        &self,
        policy: &Policy,
        d: &Decision<'_>,
        rec: &Record,
        path_q: &str,
        overridden: bool,
    ) -> Option<String> {
        if d.enforced() == Action::Block {
            return None;
        }
        let query_doubt = path_q.split_once('?').is_some_and(|(_, q)| {
            let f = model::form_model(q.as_bytes(), true);
            f.ambiguous || (f.named && f.model.map(|m| m.to_ascii_lowercase()) != self.model)
        });
        let model_doubt = self.ambiguous || self.partial || query_doubt;
        if !model_doubt && self.unreadable.is_none() {
            return None;
        }
        let play = in_play(policy, d, rec, path_q, overridden);
        if let Some(why) = self.unreadable.as_deref() {
            if play.model || play.dlp {
                return Some(format!(
                    "body_not_inspectable: the body is not UTF-8 text ({why}); model and DLP rules cannot read it"
                ));
            }
        }
        let dlp_fail_closed = policy
            .inspection
            .as_ref()
            .is_some_and(|i| i.dlp_fail_closed);
        if self.partial && play.dlp && dlp_fail_closed {
            return Some(format!(
                "body_not_inspectable: the body is larger than [inspect] max_body (first {} bytes inspected) and dlp_past_max_body = \"block\"",
                self.seen
            ));
        }
        if !play.model {
            return None;
        }
        if self.ambiguous {
            return Some(
                "body_not_inspectable: the body does not say for sure which \"model\" it names (named twice, or malformed); vendors' parsers differ"
                    .into(),
            );
        }
        if query_doubt {
            return Some(
                "body_not_inspectable: the query string names a \"model\" the body does not (or names it twice); vendors may read either"
                    .into(),
            );
        }
        if self.partial {
            return Some(format!(
                "body_not_inspectable: the body is larger than [inspect] max_body (first {} bytes inspected), so its \"model\" cannot be verified: one after the cap would count; raise max_body to admit such bodies",
                self.seen
            ));
        }
        None
    }
}

/// Which kinds of body condition could have decided this request had its body said
/// something else.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InPlay {
    pub model: bool,
    pub dlp: bool,
}

/// The body conditions in play for a decided request: those of enforcing rules at or before
/// the decision (the first match wins, so later rules never decide; shadow rules never
/// refuse) whose every other condition this request meets. When the policy decided several
/// readings of a path (dot segments, `%2F`) and merged them, or the decision is a shadow
/// rule or the default, every rule counts. Only run when something was not read: it walks the rules.
///
/// A request that names another method or path (`overridden`) may be acted on as any of
/// them: every enforcing rule for its host counts, whatever its method and path conditions.
///
/// `path_q` is the request's path and query as sent, not the record's: the record's path has
/// key-shaped segments redacted, and a redacted `sk-…%2F..%2Fchat` is no longer the chat
/// path that one of the decision's readings was.
pub fn in_play(
    policy: &Policy,
    d: &Decision<'_>,
    rec: &Record,
    path_q: &str,
    overridden: bool,
) -> InPlay {
    let Ok(host) = Host::parse(&rec.host) else {
        return InPlay {
            model: true,
            dlp: true,
        };
    };
    let hit = policy.catalog.lookup(&host);
    // Every reading `Policy::decide` merges.
    let mut paths = vec![path::normalize(path_q)];
    path::other_readings(path_q, |p| paths.push(Cow::Owned(p.to_owned())));
    let last = match d.rule {
        Some(r) if r.mode == Mode::Enforce && paths.len() == 1 && !overridden => policy
            .rules
            .iter()
            .position(|x| std::ptr::eq(x, r))
            .map_or(policy.rules.len(), |i| i + 1),
        _ => policy.rules.len(),
    };
    let groups = match rec.user.as_deref() {
        Some(u) if !policy.user_groups.is_empty() => {
            policy.user_groups.get(u).copied().unwrap_or(0)
        }
        _ => 0,
    };
    let mut play = InPlay::default();
    for rule in &policy.rules[..last] {
        let (model, dlp) = (!rule.models.is_empty(), rule.dlp != 0);
        let news = (model && !play.model) || (dlp && !play.dlp);
        if rule.mode != Mode::Enforce || !news || !host_fits(rule, &host) {
            continue;
        }
        // A model its globs match, so that only its other conditions decide.
        let witness = rule.models.first().map(|g| g.replace('*', ""));
        let fits = overridden
            || paths.iter().any(|p| {
                let segments = Segments::new(p);
                let facts = Facts {
                    client: rec.client.ip(),
                    user: rec.user.as_deref(),
                    groups,
                    method: &rec.method,
                    port: rec.port,
                    path: Some(&segments),
                    vendor: hit.map(|h| h.vendor),
                    endpoint: hit.map_or(Endpoint::None, |h| {
                        policy.catalog.classify(h, Some(&segments))
                    }),
                    model: witness.as_deref(),
                    dlp: rule.dlp,
                };
                rule.matches(&facts)
            });
        if fits {
            play.model |= model;
            play.dlp |= dlp;
        }
    }
    // Where every reading's path names the model, that is the one rules read (see
    // `Catalog::path_model`): what the body says of its model cannot change a decision.
    if play.model && !overridden {
        if let Some(h) = hit {
            play.model = !paths
                .iter()
                .all(|p| policy.catalog.path_model(h, &Segments::new(p)).is_some());
        }
    }
    play
}

/// Whether a rule's host patterns (none: any host) take this host, as the rule index does.
fn host_fits(rule: &Rule, host: &Host) -> bool {
    rule.hosts.is_empty()
        || rule.hosts.iter().any(|h| match Host::parse(h) {
            Ok(Host::Ip(ip)) => host.as_ip() == Some(ip),
            _ => {
                HostPattern::parse(h).map_or(true, |p| host.as_name().is_some_and(|n| p.matches(n)))
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BodyFacts, Request};
    use crate::proxy::records::{record, Seen};
    use crate::proxy::Peer;
    use http::Method;

    fn policy(rules: &str) -> (tempfile::TempDir, Policy) {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let path = dir.path().join("p.toml");
        let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
        std::fs::write(&path, format!("include = [\"{vendors}\"]\n\n{rules}")).expect("write");
        let loaded = crate::config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
        (dir, loaded.policy)
    }

    /// What is in play for a request decided with this model (as the body showed it).
    fn play(p: &Policy, client: &str, host: &str, path_q: &str, model: Option<&str>) -> InPlay {
        let host_parsed = Host::parse(host).expect("host");
        let d = p.decide(&Request {
            client: client.parse().expect("ip"),
            user: None,
            method: &Method::POST,
            host: &host_parsed,
            port: 443,
            path: Some(path_q),
            body: BodyFacts { model, dlp: 0 },
        });
        // The record the handler makes for this request and decision.
        let seen = Seen {
            peer: Peer::new(format!("{client}:40000").parse().expect("client")),
            user: None,
            method: &Method::POST,
            scheme: "https",
            host: &host_parsed,
            port: 443,
            path: Some(path_q),
            tls: "intercept",
        };
        in_play(p, &d, &record(&seen, &d, 0, None), path_q, false)
    }

    const NONE: InPlay = InPlay {
        model: false,
        dlp: false,
    };
    const MODEL: InPlay = InPlay {
        model: true,
        dlp: false,
    };

    #[test]
    fn inspect_in_play_follows_rule_order_vendor_and_endpoint() {
        let (_d, p) = policy(
            "[[rule]]\nid = \"files-ok\"\nvendor = \"openai\"\nendpoint = \"files\"\naction = \"allow\"\n\n\
             [[rule]]\nid = \"gpt35-ok\"\nvendor = \"openai\"\nmodel = \"gpt-3.5*\"\naction = \"allow\"\n\n\
             [[rule]]\nid = \"openai-chat\"\nvendor = \"openai\"\nendpoint = \"chat\"\naction = \"block\"\n",
        );
        let ip = "10.0.0.1";
        let openai = "api.openai.com";
        // Decided by the model rule itself, or by a rule after it: in play.
        assert_eq!(
            play(
                &p,
                ip,
                openai,
                "/v1/chat/completions",
                Some("gpt-3.5-turbo")
            ),
            MODEL
        );
        assert_eq!(play(&p, ip, openai, "/v1/embeddings", None), MODEL);
        // Decided before any model rule (uploads), or another vendor: not in play.
        assert_eq!(play(&p, ip, openai, "/v1/files", None), NONE);
        assert_eq!(
            play(&p, ip, openai, "/v1/files?purpose=x", Some("gpt-4o")),
            NONE
        );
        assert_eq!(
            play(&p, ip, "api.anthropic.com", "/v1/messages", None),
            NONE
        );
        // An encoded slash: the policy decided two paths, so every rule counts.
        assert_eq!(play(&p, ip, openai, "/v1%2Ffiles", None), MODEL);
    }

    #[test]
    fn inspect_in_play_reads_every_condition_but_the_body() {
        let (_d, p) = policy(
            "[[rule]]\nid = \"trial\"\nvendor = \"openai\"\nmodel = \"o1*\"\naction = \"block\"\nmode = \"shadow\"\n\n\
             [[rule]]\nid = \"lab-secrets\"\nclient = \"10.0.0.0/8\"\ndlp = \"all\"\naction = \"block\"\n\n\
             [[rule]]\nid = \"example\"\nhost = \"*.example.ai\"\npath = \"/v2/*\"\nmodel = [\"big-*\", \"huge\"]\naction = \"block\"\n",
        );
        // A shadow rule never refuses: nothing in play for OpenAI from outside the lab.
        assert_eq!(
            play(
                &p,
                "192.0.2.1",
                "api.openai.com",
                "/v1/chat/completions",
                None
            ),
            NONE
        );
        // The lab's DLP rule, by client address.
        assert_eq!(
            play(
                &p,
                "10.1.2.3",
                "api.openai.com",
                "/v1/chat/completions",
                None
            ),
            InPlay {
                model: false,
                dlp: true
            }
        );
        // The host rule, by host pattern and path.
        assert_eq!(
            play(&p, "192.0.2.1", "api.example.ai", "/v2/run", None),
            MODEL
        );
        assert_eq!(
            play(&p, "192.0.2.1", "api.example.ai", "/v1/run", None),
            NONE
        );
        assert_eq!(play(&p, "192.0.2.1", "example.ai", "/v2/run", None), NONE);
        assert_eq!(
            play(&p, "10.1.2.3", "api.example.ai", "/v2/run", None),
            InPlay {
                model: true,
                dlp: true
            }
        );
    }

    fn headers(ct: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in ct {
            h.append(CONTENT_TYPE, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn inspect_declared_reads_content_type_fields() {
        let d = declared(&headers(&["multipart/form-data; boundary=\"a b\""]));
        assert_eq!(d.multipart, vec![b"a b".to_vec()]);
        assert!(d.binary && !d.form && d.unreadable.is_none());
        let d = declared(&headers(&[
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
        ]));
        assert!(d.form && !d.binary && d.unreadable.is_none());
        for ct in [
            "application/x-protobuf",
            "application/json+protobuf",
            "application/grpc-web+proto",
            "application/json; charset=utf-16",
            "application/json;charset=\"UTF-32LE\"",
            "text/plain; charset=iso-2022-jp",
            "application/json; charset=\"utf-8",
        ] {
            assert!(declared(&headers(&[ct])).unreadable.is_some(), "{ct}");
        }
        // A second field counts too.
        let d = declared(&headers(&[
            "application/json",
            "text/plain; charset=utf-16le",
        ]));
        assert!(d.unreadable.is_some());
        let d = declared(&headers(&["image/png", "application/json"]));
        assert!(
            !d.binary,
            "one text field is enough to read NULs as a sign of UTF-16"
        );
        assert!(!declared(&headers(&[])).binary);
    }

    fn read(ct: &[&str], body: &[u8], complete: bool) -> (Option<String>, bool) {
        let mut out = Inspected::default();
        let scanner = crate::inspect::dlp::Scanner::new(&[]).expect("built-in patterns");
        read_model(&mut out, body, &declared(&headers(ct)), complete, &scanner);
        (out.model, out.ambiguous)
    }

    #[test]
    fn inspect_read_model_takes_each_reading_the_type_allows() {
        let json = br#"{"model":"GPT-4o"}"#;
        assert_eq!(
            read(&["application/json"], json, true),
            (Some("gpt-4o".into()), false)
        );
        // A JSON body is read as JSON whatever the type says.
        assert_eq!(
            read(&["text/plain"], json, true),
            (Some("gpt-4o".into()), false)
        );
        let form = "application/x-www-form-urlencoded";
        assert_eq!(
            read(&[form], b"model=GPT-4o", true),
            (Some("gpt-4o".into()), false)
        );
        // A form body is read as a form only when declared one.
        assert_eq!(
            read(&["application/json"], b"model=gpt-4o", true),
            (None, false)
        );
        // Two readings that disagree are ambiguous.
        let both = br#"{"model":"gpt-4o-mini","x":"&model=gpt-4o"}"#;
        assert!(read(&[form], both, true).1);
        let mp =
            b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n";
        assert_eq!(
            read(&["multipart/form-data; boundary=b"], mp, true),
            (Some("whisper-1".into()), false)
        );
        assert!(read(&["multipart/form-data"], mp, true).1, "no boundary");
        // Boundaries parsers pick differently: Werkzeug and python-multipart take the last of
        // two, an RFC 2231 one, or the token before a comma.
        for ct in [
            "multipart/form-data; boundary=x; boundary=b",
            "multipart/form-data; boundary=b; boundary=b",
            "multipart/form-data; boundary=x; boundary*=utf-8''b",
            "multipart/form-data; boundary*=utf-8''b",
            "multipart/form-data; boundary*0=b",
        ] {
            assert!(read(&[ct], mp, true).1, "{ct}");
        }
        for ct in [
            "multipart/form-data; boundary=b, x",
            "multipart/form-data; boundary=b x",
        ] {
            assert!(declared(&headers(&[ct])).unreadable.is_some(), "{ct}");
        }
    }
}
