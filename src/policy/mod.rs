//! The compiled, immutable policy and `decide`: a pure function from request facts to a
//! decision. No I/O, no locks, no allocation on the common path; it is benchmarked.
//!
//! Rules are ordered and the first match wins. To avoid scanning every rule, each rule is filed
//! under the most selective thing it names (its host patterns, else its vendors, else "generic");
//! a request looks up only the lists it can be in, takes the first full match of each list
//! (lists are in rule order) and keeps the lowest rule number among them.

pub mod catalog;
pub mod describe;
pub mod hostmatch;
pub mod inside;
pub mod path;
pub mod rules;
pub mod target;

use std::net::IpAddr;
use std::sync::Arc;

use http::Method;
use rustc_hash::FxHashMap;

pub use catalog::{Catalog, Endpoint, Vendor, VendorId};
pub use hostmatch::{HostIndex, HostPattern};
pub use inside::{BodyFacts, Inspection, InterceptLists};
pub use rules::{Action, Facts, Mode, Rule};
pub use target::{Host, Scheme, Target};

/// What happens when no rule matches.
#[derive(Debug, Clone)]
pub struct DefaultVerdict {
    pub action: Action,
    pub reason: Arc<str>,
}

#[derive(Debug, Default)]
pub struct RuleIndex {
    pub by_host: HostIndex<Vec<u32>>,
    pub by_ip: FxHashMap<IpAddr, Vec<u32>>,
    pub by_vendor: Vec<Vec<u32>>,
    pub generic: Vec<u32>,
    /// The same lists without the rules that name a path, for tunnels.
    pub by_vendor_pathless: Vec<Vec<u32>>,
    pub generic_pathless: Vec<u32>,
}

/// The compiled policy. Built once per (re)load by `config::compile`, then only read.
#[derive(Debug)]
pub struct Policy {
    pub catalog: Catalog,
    pub rules: Vec<Rule>,
    pub index: RuleIndex,
    pub default: DefaultVerdict,
    /// user → bit set of groups
    pub user_groups: FxHashMap<Box<str>, u64>,
    pub group_names: Vec<Arc<str>>,
    /// Ports a CONNECT may open.
    pub connect_ports: Vec<u16>,
    pub intercept: InterceptLists,
    /// `None`: no rule looks inside bodies.
    pub inspection: Option<Inspection>,
}

/// One request as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub client: IpAddr,
    pub user: Option<&'a str>,
    pub method: &'a Method,
    pub host: &'a Host,
    pub port: u16,
    /// Path and query as sent; `None` for a CONNECT, whose path is not visible.
    pub path: Option<&'a str>,
    /// What body inspection found; default when the body was not inspected.
    pub body: BodyFacts<'a>,
}

/// The outcome of `decide`, borrowing names from the policy (no copies per request).
#[derive(Debug, Clone, Copy)]
pub struct Decision<'p> {
    pub vendor: Option<&'p Vendor>,
    pub endpoint: Endpoint,
    pub rule: Option<&'p Rule>,
    pub action: Action,
    pub mode: Mode,
    pub reason: &'p Arc<str>,
    /// A second rule whose tenant restriction and headers apply too: another reading of the
    /// request (its path spelled another way, an override) met it ([`Decision::merge`]).
    pub also: Option<&'p Rule>,
}

/// The reason of a request whose readings different rules restrict ([`Decision::merge`]).
static AMBIGUOUS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| {
    Arc::from(
        "ambiguous_request: the path or method reads several ways here, and the readings are \
         restricted by rules that cannot all be applied (two limit rules)",
    )
});

/// The reason of a body naming models that different limit rules cover
/// ([`Decision::merge_models`]).
static AMBIGUOUS_MODELS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| {
    Arc::from(
        "ambiguous_request: the body names models that different limit rules cover, and one \
         request cannot be charged to both; send them apart, or give them one limit rule",
    )
});

impl Decision<'_> {
    /// What the proxy actually does: shadow rules never block.
    pub fn enforced(&self) -> Action {
        match self.mode {
            Mode::Enforce => self.action,
            Mode::Shadow => Action::Allow,
        }
    }

    /// Whether letting the request through on this decision loses nothing another decision
    /// of the same request would have applied: no block, no limit, no tenant restriction,
    /// no headers to set. Shadow rules never act, so they hold nothing back either.
    fn holds_nothing_back(&self) -> bool {
        match self.enforced() {
            Action::Block | Action::Limit => false,
            _ if self.mode == Mode::Shadow => true,
            _ => !self.rule.is_some_and(|r| {
                !r.require_keys.is_empty()
                    || !r.require_orgs.is_empty()
                    || !r.set_headers.is_empty()
            }),
        }
    }

    /// This decision, with `other`'s endpoint class where this reading of the path named
    /// none: `/v1/x%2F..%2Fchat%2Fcompletions` is recorded and counted as the `chat` request
    /// an origin routing on the decoded path serves, not as `unknown`.
    fn naming(self, other: &Self) -> Self {
        match (self.endpoint, other.endpoint) {
            (Endpoint::Unknown, e) if e != Endpoint::Unknown && e != Endpoint::None => Decision {
                endpoint: e,
                ..self
            },
            _ => self,
        }
    }

    /// One decision for a request that can be read two ways (two spellings of its path, or
    /// the method an override header names), when which reading the origin acts on is not
    /// known here. A block on either reading blocks. A reading that holds nothing back
    /// yields to the other. Two different rules that each restrict the request both apply:
    /// the limit rule's limits (there is one) and the other's tenant restriction and headers
    /// ([`Decision::also`]), so the client cannot choose by its spelling which one it meets.
    /// What cannot be applied together (two limit rules, a third restricting rule) is refused
    /// as ambiguous.
    pub fn merge(self, other: Self) -> Self {
        let same_rule = match (self.rule, other.rule) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same_rule || self.enforced() == Action::Block {
            return self.naming(&other);
        }
        if other.enforced() == Action::Block {
            return other;
        }
        match (self.holds_nothing_back(), other.holds_nothing_back()) {
            // An audit or shadow rule still marks the request: the record shows what would
            // have been done (an audit first).
            (true, true) if other.mark() > self.mark() => other.naming(&self),
            (true, true) | (false, true) => self.naming(&other),
            (true, false) => other.naming(&self),
            (false, false) => {
                let (main, extra) = match other.enforced() == Action::Limit {
                    true => (other, self),
                    false => (self, other),
                };
                let fits = |r: &Rule| {
                    extra.enforced() != Action::Limit
                        && extra.also.is_none()
                        && main.also.is_none_or(|a| std::ptr::eq(a, r))
                };
                match extra.rule {
                    Some(r) if fits(r) => Decision {
                        also: Some(r),
                        ..main
                    },
                    _ => Decision {
                        vendor: self.vendor.or(other.vendor),
                        endpoint: self.endpoint,
                        rule: None,
                        action: Action::Block,
                        mode: Mode::Enforce,
                        reason: &AMBIGUOUS,
                        also: None,
                    },
                }
            }
        }
    }

    /// As [`Decision::merge`], for a body that names several models (a batch's requests),
    /// each decided: a block on any blocks. Two limit rules cannot both be charged, so such a
    /// body is refused, and the reason says why.
    pub fn merge_models(self, other: Self) -> Self {
        let merged = self.merge(other);
        match std::ptr::eq(merged.reason, &*AMBIGUOUS) {
            true => Decision {
                reason: &AMBIGUOUS_MODELS,
                ..merged
            },
            false => merged,
        }
    }

    /// How a decision that holds nothing back still marks the request: 2 for an audit rule, 1
    /// for a shadow rule (what it would have done), 0 for none.
    fn mark(&self) -> u8 {
        match (self.enforced(), self.mode) {
            (Action::Audit, _) => 2,
            (_, Mode::Shadow) if self.rule.is_some() => 1,
            _ => 0,
        }
    }

    /// The rules whose tenant restrictions and headers apply: the deciding one, and the one
    /// another reading met.
    pub fn restricting_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rule.into_iter().chain(self.also)
    }

    pub fn vendor_id(&self) -> Option<&Arc<str>> {
        self.vendor.map(|v| &v.id)
    }

    pub fn rule_id(&self) -> Option<&Arc<str>> {
        self.rule.map(|r| &r.id)
    }
}

impl Policy {
    pub fn decide<'p>(&'p self, req: &Request<'_>) -> Decision<'p> {
        let Some(raw) = req.path else {
            return self.decide_on(req, None);
        };
        // The usual API path is already normal: split in the same pass that checks it.
        if let Some(segments) = path::Segments::of_normal(raw) {
            return self.decide_on(req, Some(&segments));
        }
        let path = path::normalize(raw);
        let d = self.decide_on(req, Some(&path::Segments::new(&path)));
        // Only a path `normalize` had to copy (it has a `%`, a `.` after a slash, `;`, `\` or
        // upper case) can be read another way.
        match path {
            std::borrow::Cow::Owned(_) => self.other_readings(req, raw, d),
            std::borrow::Cow::Borrowed(_) => d,
        }
    }

    /// Origins disagree on how to read some paths, and which reading the origin will use is
    /// unknown here, so each such path is decided every way and the decisions merged
    /// ([`Decision::merge`]):
    /// - dot segments: the normal form resolves them, but origins that route on the path as
    ///   sent (Express, many gateways) still see `/v1/files/..` under `/v1/files`;
    /// - `%2F` (and `%5C`) and `%3A` are data to RFC 3986 and to most origins, but some (ASGI
    ///   servers among them) route on the decoded path, where `/v1%2Ffiles` is `/v1/files` and
    ///   `/models/x%3AgenerateContent` is Gemini's `generateContent`;
    /// - and both at once (`/v1/files%2F..`).
    ///
    /// Out of line: `decide` stays small for the usual path, which never gets here.
    #[inline(never)]
    fn other_readings<'p>(
        &'p self,
        req: &Request<'_>,
        raw: &str,
        mut d: Decision<'p>,
    ) -> Decision<'p> {
        path::other_readings(raw, |path| {
            d = d.merge(self.decide_on(req, Some(&path::Segments::new(path))));
        });
        d
    }

    /// Rules that act (block, limit, audit) only on what an opaque tunnel cannot show (a path,
    /// an endpoint class other than `app`/`unknown`, a model, a body) and name vendors that
    /// are not intercepted: over HTTPS, the way those vendors are reached, they never match.
    /// Said by `check`, at start and at each reload, so a rule that does nothing is not a
    /// surprise.
    pub fn blind_rules(&self) -> Vec<String> {
        let seen_in_tunnels = Endpoint::App.bit() | Endpoint::Unknown.bit();
        let mut out = Vec::new();
        for r in &self.rules {
            let opaque: Vec<&str> = r
                .vendors
                .iter()
                .filter(|&&v| {
                    !self
                        .intercept
                        .vendors
                        .get(v as usize)
                        .copied()
                        .unwrap_or(false)
                })
                .map(|&v| &*self.catalog.vendor(v).id)
                .collect();
            let these = match opaque.len() {
                1 => "this vendor is",
                _ => "these vendors are",
            };
            // A tunnel shows neither its requests nor their keys: a request count counts
            // tunnels there, and a key falls back to the client address.
            let rate = r
                .limits
                .iter()
                .any(|l| matches!(l.kind, crate::limits::LimitKind::Rate { .. }));
            let by_key = r
                .limits
                .iter()
                .any(|l| l.by.contains(&crate::limits::KeyPart::Key));
            let needs_inside =
                r.needs_inside() || (r.endpoints != 0 && r.endpoints & seen_in_tunnels == 0);
            if r.action == Action::Limit && (rate || by_key) && !needs_inside && !opaque.is_empty()
            {
                out.push(format!(
                    "rule {} limits {}, but {these} not intercepted: in HTTPS tunnels it counts {} (add to [intercept] vendors: {})",
                    r.id,
                    match (rate, by_key) {
                        (true, true) => "requests by API key",
                        (true, false) => "requests",
                        _ => "by API key",
                    },
                    match (rate, by_key) {
                        (true, true) => "tunnels opened, by client address",
                        (true, false) => "tunnels opened, however many requests each carries",
                        _ => "by client address, a tunnel's keys being unseen",
                    },
                    opaque.join(", ")
                ));
            }
            if r.action == Action::Allow || !needs_inside {
                continue;
            }
            if !opaque.is_empty() {
                out.push(format!(
                    "rule {} looks inside requests (path, endpoint, model or body), but {} not intercepted: it applies to plain HTTP only, not to HTTPS tunnels (add to [intercept] vendors: {})",
                    r.id,
                    these,
                    opaque.join(", ")
                ));
            }
        }
        out
    }

    /// The model the request's path names, for vendors whose APIs put it there (see
    /// [`catalog::Catalog::path_model`]), lowercased as rules read it. For the audit record
    /// and `explain`; decisions find it in their own pass.
    pub fn path_model(&self, host: &Host, path_q: &str) -> Option<String> {
        let hit = self.catalog.lookup(host)?;
        if !self.catalog.vendor(hit.vendor).names_models() {
            return None;
        }
        let path = path::normalize(path_q);
        let segments = path::Segments::new(&path);
        self.catalog.path_model(hit, &segments).map(str::to_owned)
    }

    /// The fields where a body sent to this host and path names models, deeper than the
    /// top-level `model` (the vendor's `model_fields`), on any reading of the path: a batch
    /// path spelled `/v1/messages%2Fbatches` is still read as a batch.
    pub fn model_fields(
        &self,
        host: &Host,
        path_q: &str,
    ) -> Vec<&crate::inspect::model::FieldPath> {
        let Some(hit) = self.catalog.lookup(host) else {
            return Vec::new();
        };
        let v = self.catalog.vendor(hit.vendor);
        let path = path::normalize(path_q);
        let mut found = v.model_fields(&path::Segments::new(&path));
        path::other_readings(path_q, |p| {
            for f in v.model_fields(&path::Segments::new(p)) {
                if !found.iter().any(|x| std::ptr::eq(*x, f)) {
                    found.push(f);
                }
            }
        });
        found
    }

    /// Whether the request's body could change its decision: some rule with a `model` or
    /// `dlp` condition matches everything else about it (on any reading of its path), before
    /// any enforcing rule without one that matches. Only then is the body worth holding back:
    /// a DLP rule on `chat` must not make every upload to the vendor wait for inspection.
    pub fn body_could_decide(&self, req: &Request<'_>) -> bool {
        let Some(raw) = req.path else {
            // Body rules need a visible request; a tunnel has none.
            return false;
        };
        if let Some(segments) = path::Segments::of_normal(raw) {
            return self.body_could_decide_on(req, &segments);
        }
        let path = path::normalize(raw);
        let mut could = self.body_could_decide_on(req, &path::Segments::new(&path));
        if let std::borrow::Cow::Owned(_) = path {
            path::other_readings(raw, |p| {
                could = could || self.body_could_decide_on(req, &path::Segments::new(p));
            });
        }
        could
    }

    fn body_could_decide_on(&self, req: &Request<'_>, segments: &path::Segments<'_>) -> bool {
        let (facts, hit) = self.facts_of(req, Some(segments));
        // The first enforcing rule that matches whatever the body says, and the first rule
        // the body could make match: the body matters when the second comes first.
        let mut settled = u32::MAX;
        let mut first_body = u32::MAX;
        self.for_each_candidate_list(req.host, hit, true, |list| {
            for &i in list {
                if i >= settled.min(first_body) {
                    return;
                }
                let rule = &self.rules[i as usize];
                if !rule.matches_but_body(&facts) {
                    continue;
                }
                // A model the path names is known now: the rule is decided without the body
                // unless it also has DLP patterns.
                if rule.dlp != 0 || (!rule.models.is_empty() && facts.model.is_none()) {
                    first_body = i;
                    return;
                }
                if !rule.matches(&facts) {
                    continue;
                }
                if rule.mode == Mode::Enforce {
                    settled = i;
                    return;
                }
            }
        });
        first_body < settled
    }

    /// What the rules match on, for one reading of the request's path.
    fn facts_of<'r>(
        &self,
        req: &Request<'r>,
        segments: Option<&'r path::Segments<'r>>,
    ) -> (Facts<'r>, Option<catalog::VendorHit>) {
        let hit = self.catalog.lookup(req.host);
        let endpoint = match hit {
            Some(h) => self.catalog.classify(h, segments),
            None => Endpoint::None,
        };
        let groups = match req.user {
            Some(u) if !self.user_groups.is_empty() => {
                self.user_groups.get(u).copied().unwrap_or(0)
            }
            _ => 0,
        };
        let facts = Facts {
            client: req.client,
            user: req.user,
            groups,
            method: req.method,
            port: req.port,
            path: segments,
            vendor: hit.map(|h| h.vendor),
            endpoint,
            // Where the vendor's path names the model, that is the one its API serves: a
            // `model` in the body is not read there.
            model: match (hit, segments) {
                (Some(h), Some(s)) => self.catalog.path_model(h, s).or(req.body.model),
                _ => req.body.model,
            },
            dlp: req.body.dlp,
        };
        (facts, hit)
    }

    /// The index's lists of rules that may apply to `host`, each in rule order; a rule is in
    /// one of them at most.
    fn for_each_candidate_list(
        &self,
        host: &Host,
        hit: Option<catalog::VendorHit>,
        path_visible: bool,
        mut consider: impl FnMut(&[u32]),
    ) {
        // Without a visible path (a tunnel) rules that need one cannot match: skip them.
        let (generic, by_vendor) = match path_visible {
            true => (&self.index.generic, &self.index.by_vendor),
            false => (&self.index.generic_pathless, &self.index.by_vendor_pathless),
        };
        consider(generic);
        if let Some(h) = hit {
            if let Some(list) = by_vendor.get(h.vendor as usize) {
                consider(list);
            }
        }
        match host {
            Host::Name(name) => self.index.by_host.for_each_match(name, |list, _| {
                consider(list);
                true
            }),
            Host::Ip(ip) => {
                if let Some(list) = self.index.by_ip.get(ip) {
                    consider(list);
                }
            }
        }
    }

    /// The decision on an already normalised path.
    fn decide_on<'p>(
        &'p self,
        req: &Request<'_>,
        segments: Option<&path::Segments<'_>>,
    ) -> Decision<'p> {
        let (facts, hit) = self.facts_of(req, segments);

        // The first match, and the first enforcing match: a shadow rule must not change what
        // happens (a trial allow above a block, or above `defaults.action = "block"`, would
        // otherwise let traffic through).
        let mut best = u32::MAX;
        let mut best_enforced = u32::MAX;
        let consider = |list: &[u32]| {
            // Lists are in rule order: the first enforcing match ends this list.
            for &i in list {
                if i >= best_enforced {
                    return;
                }
                let rule = &self.rules[i as usize];
                if rule.matches(&facts) {
                    best = best.min(i);
                    if rule.mode == Mode::Enforce {
                        best_enforced = i;
                        return;
                    }
                }
            }
        };
        self.for_each_candidate_list(req.host, hit, segments.is_some(), consider);

        let endpoint = facts.endpoint;
        let vendor = hit.map(|h| self.catalog.vendor(h.vendor));
        // A shadow rule is what the record shows only when the enforcing decision lets the
        // request through as is; a block, a limit, a tenant check or injected headers of the
        // enforcing decision are what happens, and what is recorded.
        let shown = match self.rules.get(best_enforced as usize) {
            _ if best == best_enforced => best,
            Some(r) if r.action == Action::Block || r.action == Action::Limit => best_enforced,
            Some(r)
                if !r.require_keys.is_empty()
                    || !r.require_orgs.is_empty()
                    || !r.set_headers.is_empty() =>
            {
                best_enforced
            }
            None if self.default.action == Action::Block => best_enforced,
            _ => best,
        };
        match self.rules.get(shown as usize) {
            Some(rule) => Decision {
                vendor,
                endpoint,
                rule: Some(rule),
                action: rule.action,
                mode: rule.mode,
                reason: &rule.reason,
                also: None,
            },
            None => Decision {
                vendor,
                endpoint,
                rule: None,
                action: self.default.action,
                mode: Mode::Enforce,
                reason: &self.default.reason,
                also: None,
            },
        }
    }

    /// Groups of a user, for the audit record.
    pub fn groups_of(&self, user: &str) -> impl Iterator<Item = &Arc<str>> {
        let mask = self.user_groups.get(user).copied().unwrap_or(0);
        self.group_names
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & (1 << i) != 0)
            .map(|(_, g)| g)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The shipped catalog and `rules`, compiled by the real loader.
    fn policy(rules: &str) -> Policy {
        let dir = tempfile::tempdir().unwrap();
        let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
        let file = dir.path().join("p.toml");
        std::fs::write(&file, format!("include = [{vendors:?}]\n{rules}")).unwrap();
        crate::config::load(&file).unwrap().policy
    }

    /// (action, rule, endpoint) for `method host path`.
    fn decide(p: &Policy, method: &Method, host: &str, path: &str) -> (Action, String, Endpoint) {
        let host = Host::parse(host).unwrap();
        let d = p.decide(&Request {
            client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            user: None,
            method,
            host: &host,
            port: 443,
            path: Some(path),
            body: Default::default(),
        });
        let rule = d.rule_id().map_or("default".into(), |r| r.to_string());
        (d.enforced(), rule, d.endpoint)
    }

    /// The vendor of a decision is the catalog's most specific match, also where rules name
    /// the same or nearby hosts.
    #[test]
    fn the_vendor_is_the_catalogs_whatever_the_rules_name() {
        let p = policy(
            r#"
[[rule]]
id = "near"
host = [".openai.com", "api.openai.com", "*.deepseek.com", ".com", "x.googleapis.com"]
action = "audit"
"#,
        );
        let mut hosts = vec!["example.org".to_string(), "com".into(), "openai.com".into()];
        for (pat, _, _) in p.catalog.patterns() {
            let bare = pat.trim_start_matches("*.").trim_start_matches('.');
            let named = bare.replace('*', "x");
            hosts.extend([named.clone(), format!("x.{named}"), format!("x.y.{named}")]);
        }
        for host in &hosts {
            let h = Host::parse(host).unwrap();
            let d = p.decide(&Request {
                client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                user: None,
                method: &Method::GET,
                host: &h,
                port: 443,
                path: Some("/"),
                body: Default::default(),
            });
            let want = p
                .catalog
                .lookup(&h)
                .map(|hit| &*p.catalog.vendor(hit.vendor).id);
            assert_eq!(d.vendor.map(|v| &*v.id), want, "{host}");
        }
    }

    /// A host under many patterns has every one's rules considered: the least specific
    /// pattern here is the first rule, and it is found.
    #[test]
    fn a_host_under_many_patterns_has_all_their_rules() {
        let labels = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"];
        let host = format!("{}.example", labels.join("."));
        let mut rules =
            String::from("[[rule]]\nid = \"widest\"\nhost = \".example\"\naction = \"block\"\n");
        for i in 1..labels.len() {
            let suffix = format!("{}.example", labels[i..].join("."));
            rules.push_str(&format!(
                "[[rule]]\nid = \"r{i}\"\nhost = \".{suffix}\"\naction = \"audit\"\n"
            ));
        }
        let p = policy(&rules);
        let (action, rule, _) = decide(&p, &Method::GET, &host, "/");
        assert_eq!((action, rule.as_str()), (Action::Block, "widest"));
    }

    /// Whether `method host path` would have its body read for the rules.
    fn reads_body(p: &Policy, method: &Method, host: &str, path: Option<&str>) -> bool {
        let host = Host::parse(host).unwrap();
        p.body_could_decide(&Request {
            client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            user: None,
            method,
            host: &host,
            port: 443,
            path,
            body: Default::default(),
        })
    }

    /// A body is read only where a body rule could decide the request: its other conditions
    /// met (on some reading of the path), and no enforcing rule without a body condition
    /// matching first. A shadow rule first does not settle it.
    #[test]
    fn the_body_is_read_only_where_a_body_rule_could_decide() {
        let p = policy(
            r#"
[[rule]]
id = "trial"
vendor = "openai"
endpoint = "chat"
mode = "shadow"
action = "block"

[[rule]]
id = "no-secrets-in-chat"
vendor = "openai"
endpoint = ["chat", "files"]
method = "POST"
dlp = "all"
action = "block"

[[rule]]
id = "embeddings-ok"
vendor = "anthropic"
action = "allow"

[[rule]]
id = "no-opus"
vendor = "anthropic"
model = "claude-opus*"
action = "block"

[[rule]]
id = "dlp-everywhere-else"
host = ".example.org"
dlp = "all"
action = "block"
"#,
        );
        let post = &Method::POST;
        let chat = Some("/v1/chat/completions");
        assert!(reads_body(&p, post, "api.openai.com", chat));
        assert!(!reads_body(&p, &Method::GET, "api.openai.com", chat));
        assert!(!reads_body(
            &p,
            post,
            "api.openai.com",
            Some("/v1/embeddings")
        ));
        // Read as sent, `/v1/files/..` is under files: its body may be a file upload.
        assert!(reads_body(&p, post, "api.openai.com", Some("/v1/files/..")));
        assert!(reads_body(&p, post, "api.openai.com", Some("/v1%2Ffiles")));
        // No path, no body rule: a CONNECT.
        assert!(!reads_body(&p, &Method::CONNECT, "api.openai.com", None));
        // An allow for the whole vendor comes first: the model rule can never decide.
        assert!(!reads_body(
            &p,
            post,
            "api.anthropic.com",
            Some("/v1/messages")
        ));
        assert!(reads_body(&p, post, "x.example.org", Some("/upload")));
        assert!(!reads_body(&p, post, "example.com", Some("/upload")));
    }

    /// Gemini, Vertex and Bedrock name the model in the path, not the body: model rules read
    /// it there, and no body is held back for them.
    #[test]
    fn a_model_the_path_names_is_the_one_rules_read() {
        let p = policy(
            r#"
[[rule]]
id = "no-big-models"
vendor = ["google-gemini", "google-vertex", "aws-bedrock"]
model = ["gemini-2.5-pro*", "anthropic.claude-opus*"]
action = "block"
"#,
        );
        let post = Method::POST;
        let gemini = "generativelanguage.googleapis.com";
        let vertex = "us-central1-aiplatform.googleapis.com";
        let bedrock = "bedrock-runtime.us-east-1.amazonaws.com";
        let block = |host: &str, path: &str| {
            assert_eq!(
                decide(&p, &post, host, path).0,
                Action::Block,
                "{host}{path}"
            );
        };
        block(gemini, "/v1beta/models/gemini-2.5-pro:generateContent");
        block(
            gemini,
            "/v1/models/GEMINI-2.5-PRO:streamGenerateContent?alt=sse",
        );
        block(gemini, "/v1beta/models/gemini-2.5-pro%3AgenerateContent");
        block(gemini, "/v1beta/models/gemini-2.5-pro");
        block(
            vertex,
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro-preview:generateContent",
        );
        block(bedrock, "/model/anthropic.claude-opus-4-v1:0/invoke");
        block(
            bedrock,
            "/model/anthropic.claude-opus-4-v1:0/converse-stream",
        );
        let allow = |host: &str, path: &str| {
            assert_eq!(
                decide(&p, &post, host, path).0,
                Action::Allow,
                "{host}{path}"
            );
        };
        allow(gemini, "/v1beta/models/gemini-2.5-flash:generateContent");
        allow(gemini, "/v1beta/models");
        allow(gemini, "/v1beta/openai/chat/completions");
        allow(bedrock, "/model/anthropic.claude-sonnet-4-v1:0/invoke");
        // The path's model wins over what a body says.
        let host = Host::parse(gemini).unwrap();
        let d = p.decide(&Request {
            client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            user: None,
            method: &post,
            host: &host,
            port: 443,
            path: Some("/v1beta/models/gemini-2.5-pro:generateContent"),
            body: BodyFacts {
                model: Some("gemini-2.5-flash"),
                dlp: 0,
            },
        });
        assert_eq!(d.enforced(), Action::Block);
        // Decided from the path: no body to hold back. Where the path names none, the body
        // could decide (the OpenAI-compatible endpoint).
        assert!(!reads_body(
            &p,
            &post,
            gemini,
            Some("/v1beta/models/gemini-2.5-pro:generateContent")
        ));
        assert!(!reads_body(
            &p,
            &post,
            gemini,
            Some("/v1beta/models/gemini-2.5-flash:generateContent")
        ));
        assert!(reads_body(
            &p,
            &post,
            gemini,
            Some("/v1beta/openai/chat/completions")
        ));
        assert_eq!(
            p.path_model(&host, "/v1beta/models/Gemini-2.5-Flash:generateContent?x=1")
                .as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            p.path_model(&Host::parse("api.openai.com").unwrap(), "/v1/models/gpt-4o"),
            None
        );
    }

    const DOT_RULES: &str = r#"
[[rule]]
id = "no-files"
vendor = "openai"
endpoint = "files"
action = "block"

[[rule]]
id = "no-batches"
vendor = "openai"
path = "/v1/batches"
action = "block"
"#;

    /// Origins that do not resolve dot segments (Express, many gateways) route these under the
    /// segment before the `..`, and the proxy forwards them as sent: the rule for that segment
    /// must hold, whatever the normal form (which resolves the `..`) says.
    #[test]
    fn dot_segments_are_also_decided_as_sent() {
        let p = policy(DOT_RULES);
        let get = Method::GET;
        for (path, rule, endpoint) in [
            ("/v1/files/..", "no-files", Endpoint::Files),
            ("/v1/files/%2e%2e", "no-files", Endpoint::Files),
            ("/v1/files/%2E%2e/", "no-files", Endpoint::Files),
            (
                "/v1/files/..;/file-abc/content",
                "no-files",
                Endpoint::Files,
            ),
            ("/v1/files/.%2E;x?q=1", "no-files", Endpoint::Files),
            ("/v1/files\\..", "no-files", Endpoint::Files),
            ("/v1/batches/..;x/cancel", "no-batches", Endpoint::Batches),
            ("/v1/batches/..", "no-batches", Endpoint::Batches),
            ("/V1/Batches/%2e%2e/models", "no-batches", Endpoint::Batches),
            // Both readings at once: `%2F` decoded, then the `..` kept.
            ("/v1/files%2F..", "no-files", Endpoint::Files),
            (
                "/v1/batches%2f%2e%2e%2fmodels",
                "no-batches",
                Endpoint::Batches,
            ),
            // The normal form still counts: a detour into a blocked path.
            ("/v1/models/../files", "no-files", Endpoint::Files),
        ] {
            assert_eq!(
                decide(&p, &get, "api.openai.com", path),
                (Action::Block, rule.to_string(), endpoint),
                "{path}"
            );
        }
        // The stricter reading wins; where neither is blocked nothing changes.
        for path in [
            "/v1/models/..",
            "/v1/models/./x",
            "/v1/.well-known/..",
            "/v1/%2e%2e",
        ] {
            assert_eq!(
                decide(&p, &get, "api.openai.com", path).0,
                Action::Allow,
                "{path}"
            );
        }
    }

    /// A path that reads several ways must not let the client pick which rule applies: a
    /// limit on one reading and a tenant restriction (or headers to set) on another both
    /// apply; two limit rules cannot, and the request is refused; a reading whose rule holds
    /// nothing back yields to the other.
    #[test]
    fn readings_restricted_by_different_rules_all_apply() {
        let p = policy(
            r#"
[[rule]]
id = "bulk"
vendor = "openai"
endpoint = ["batches", "files"]
action = "limit"
limit = { requests = 5, per = "1m" }

[[rule]]
id = "chat-cap"
vendor = "openai"
endpoint = "chat"
action = "limit"
limit = { requests = 50, per = "1m" }

[[rule]]
id = "audit-models"
vendor = "openai"
endpoint = "models"
action = "audit"

[[rule]]
id = "company-only"
vendor = "openai"
action = "allow"
require_key = ["k_000000000000"]
set_headers = { "openai-organization" = "org-company" }
"#,
        );
        let post = Method::POST;
        let host = Host::parse("api.openai.com").unwrap();
        let decide_full = |path: &str| {
            p.decide(&Request {
                client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                user: None,
                method: &post,
                host: &host,
                port: 443,
                path: Some(path),
                body: Default::default(),
            })
        };
        // Two limit rules: refused.
        for path in [
            "/v1/batches/../chat/completions",
            "/v1/files/%2e%2e/chat/completions",
            "/v1/batches%2F..%2Fchat/completions",
        ] {
            let d = decide_full(path);
            assert_eq!((d.enforced(), d.rule_id()), (Action::Block, None), "{path}");
            assert!(
                d.reason.starts_with("ambiguous_request"),
                "{path}: {}",
                d.reason
            );
        }
        // A limit and a tenant restriction: both.
        for path in ["/v1/batches/../vector_stores", "/v1/files/../assistants"] {
            let d = decide_full(path);
            assert_eq!(d.enforced(), Action::Limit, "{path}");
            assert_eq!(d.rule_id().map(|r| &**r), Some("bulk"), "{path}");
            let also = d.also.map(|r| &*r.id);
            assert_eq!(also, Some("company-only"), "{path}");
            let rules: Vec<&str> = d.restricting_rules().map(|r| &*r.id).collect();
            assert_eq!(rules, ["bulk", "company-only"], "{path}");
        }
        // One rule on every reading, or a detour through a rule that restricts nothing.
        for (path, action, rule) in [
            ("/v1/batches/../files", Action::Limit, "bulk"),
            ("/v1/batches/./x", Action::Limit, "bulk"),
            ("/v1/models/../embeddings", Action::Allow, "company-only"),
        ] {
            let got = decide(&p, &post, "api.openai.com", path);
            assert_eq!((got.0, got.1.as_str()), (action, rule), "{path}");
            assert!(decide_full(path).also.is_none(), "{path}");
        }
    }

    /// `post` is not `POST` to `http`, but some origins read it so: a method rule holds for
    /// every case of the method.
    #[test]
    fn rule_methods_match_in_any_case() {
        let p = policy(
            "[[rule]]\nid = \"no-post\"\nvendor = \"openai\"\nmethod = \"POST\"\naction = \"block\"\n\
             [[rule]]\nid = \"no-delete\"\nvendor = \"openai\"\nmethod = \"delete\"\naction = \"block\"\n",
        );
        let path = "/v1/chat/completions";
        for (m, rule) in [
            ("POST", "no-post"),
            ("post", "no-post"),
            ("Post", "no-post"),
            ("pOsT", "no-post"),
            ("DELETE", "no-delete"),
            ("delete", "no-delete"),
        ] {
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(
                decide(&p, &method, "api.openai.com", path),
                (Action::Block, rule.to_string(), Endpoint::Chat),
                "{m}"
            );
        }
        for m in ["GET", "get", "POSTX", "pos"] {
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(
                decide(&p, &method, "api.openai.com", path).0,
                Action::Allow,
                "{m}"
            );
        }
    }
}
