//! Compiled rules and the index that keeps `decide` from scanning all of them.

use std::net::IpAddr;
use std::sync::Arc;

use http::Method;
use ipnet::IpNet;

use super::catalog::{Endpoint, VendorId};
use super::hostmatch::glob_match;
use super::path::{PathPattern, Segments};

/// What a rule does with a request it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Block,
    /// Allow, and flag the record for review.
    Audit,
    /// Allow within the rule's limits; over them, 429.
    Limit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Audit => "audit",
            Action::Limit => "limit",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        [Action::Allow, Action::Block, Action::Audit, Action::Limit]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// `shadow` records what a rule would have done without doing it: how operators trial a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Enforce,
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// One rule, every condition optional; a present condition is any-of its values.
#[derive(Debug)]
pub struct Rule {
    pub id: Arc<str>,
    pub action: Action,
    pub mode: Mode,
    pub reason: Arc<str>,
    pub vendors: Vec<VendorId>,
    /// Host patterns; matched through the index, kept here for display.
    pub hosts: Vec<Box<str>>,
    /// Bit set of [`Endpoint::bit`]; 0 = any.
    pub endpoints: u16,
    pub paths: Vec<PathPattern>,
    pub methods: Vec<Method>,
    pub ports: Vec<u16>,
    pub clients: Vec<IpNet>,
    pub users: Vec<Box<str>>,
    /// Bit set of group numbers; 0 = any.
    pub groups: u64,
    /// For `action = "limit"`: checked in the order bytes, concurrent, rate.
    pub limits: Vec<Arc<crate::limits::LimitSpec>>,
    /// Lowercase globs over the body's `model`; empty = any.
    pub models: Vec<Box<str>>,
    /// Bit set of DLP pattern indices; 0 = any body.
    pub dlp: u64,
    /// Tenant restriction: key fingerprints and organisation/project ids a request must carry
    /// to pass this rule (when non-empty).
    pub require_keys: Vec<Box<str>>,
    pub require_orgs: Vec<Box<str>>,
    /// Set on requests this rule lets through, replacing what the client sent.
    pub set_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// What a rule may look at. Borrowed from the request so building it costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub client: IpAddr,
    pub user: Option<&'a str>,
    pub groups: u64,
    pub method: &'a Method,
    pub port: u16,
    /// The normalised path, split; `None` inside an opaque tunnel.
    pub path: Option<&'a Segments<'a>>,
    pub vendor: Option<VendorId>,
    pub endpoint: Endpoint,
    /// The body's `model`, lowercased, when inspected.
    pub model: Option<&'a str>,
    /// DLP patterns found in the body.
    pub dlp: u64,
}

/// Rule methods are upper case (the config folds them); a request may spell its method in any
/// case (`post` is another token to RFC 9110 and to `http`, but some origins read it as POST), and a
/// rule must not be skipped for that. No allocation: an ASCII comparison.
fn same_method(rule: &Method, request: &Method) -> bool {
    rule == request || rule.as_str().eq_ignore_ascii_case(request.as_str())
}

impl Rule {
    /// Every condition but the host (the index already matched it).
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        self.matches_but_body(f)
            && (self.models.is_empty()
                || f.model
                    .is_some_and(|m| self.models.iter().any(|g| glob_match(g, m))))
            && (self.dlp == 0 || self.dlp & f.dlp != 0)
    }

    /// Every condition but the host and the body's (`model`, `dlp`).
    pub fn matches_but_body(&self, f: &Facts<'_>) -> bool {
        (self.vendors.is_empty() || f.vendor.is_some_and(|v| self.vendors.contains(&v)))
            && (self.endpoints == 0 || self.endpoints & f.endpoint.bit() != 0)
            && (self.paths.is_empty()
                || f.path
                    .is_some_and(|p| self.paths.iter().any(|pat| pat.matches_segments(p))))
            && (self.methods.is_empty() || self.methods.iter().any(|m| same_method(m, f.method)))
            && (self.ports.is_empty() || self.ports.contains(&f.port))
            && (self.clients.is_empty() || self.clients.iter().any(|n| n.contains(&f.client)))
            && (self.users.is_empty()
                || f.user.is_some_and(|u| self.users.iter().any(|x| &**x == u)))
            && (self.groups == 0 || self.groups & f.groups != 0)
    }

    /// Whether what the body says (its `model`, DLP patterns) is among the conditions.
    pub fn reads_body(&self) -> bool {
        !self.models.is_empty() || self.dlp != 0
    }

    /// Conditions only visible inside a request (path, body): such a rule never matches an
    /// opaque tunnel.
    pub fn needs_inside(&self) -> bool {
        !self.paths.is_empty() || !self.models.is_empty() || self.dlp != 0
    }
}
