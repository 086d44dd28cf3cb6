//! What the policy needs to see inside TLS and inside request bodies: which tunnels are
//! intercepted, and when a request body is worth holding back for DLP and `model` rules.

use std::sync::Arc;
use std::time::Duration;

use super::catalog::VendorId;
use super::hostmatch::HostIndex;
use super::target::Host;
use crate::inspect::dlp::Scanner;

/// Tunnels opened with the org CA. Everything not listed stays an opaque splice.
#[derive(Debug, Default)]
pub struct InterceptLists {
    /// Indexed by vendor id.
    pub vendors: Vec<bool>,
    pub hosts: HostIndex<()>,
    /// Address literals listed under `hosts`.
    pub ips: Vec<std::net::IpAddr>,
    /// Hosts of listed vendors that stay opaque (clients that pin certificates).
    pub exclude: HostIndex<()>,
}

impl InterceptLists {
    pub fn intercepts(&self, host: &Host, vendor: Option<VendorId>) -> bool {
        let name = match host {
            Host::Name(name) => name,
            Host::Ip(ip) => return self.ips.contains(ip),
        };
        if self.exclude.best(name).is_some() {
            return false;
        }
        vendor.is_some_and(|v| self.vendors.get(v as usize).copied().unwrap_or(false))
            || self.hosts.best(name).is_some()
    }

    pub fn is_empty(&self) -> bool {
        !self.vendors.contains(&true) && self.hosts.is_empty() && self.ips.is_empty()
    }
}

/// Request-body inspection: only done when some rule needs it, and only for the vendors
/// such rules can apply to.
pub struct Inspection {
    pub scanner: Scanner,
    /// At most this much of a body is held back and inspected; the rest streams unread.
    pub max_body: usize,
    /// How long to wait for that prefix before deciding on what arrived.
    pub timeout: Duration,
    /// Bytes all held prefixes together may occupy (`max_buffered`), and one client's share:
    /// without it, many slow uploads each held at `max_body` are a memory exhaustion. One per
    /// policy: a reload starts a fresh budget while requests admitted under the old one finish.
    pub budget: Arc<crate::proxy::budget::InspectBudget>,
    /// Some rule has a `model` condition.
    pub models: bool,
    /// Union of the DLP masks of all rules: patterns nobody asks for are still scanned (one
    /// pass finds them all) but this tells whether to scan at all.
    pub dlp: u64,
    /// `dlp_past_max_body = "block"`: a body longer than `max_body` that a DLP rule could
    /// decide is refused, not passed on with only its prefix scanned.
    pub dlp_fail_closed: bool,
    /// Indexed by vendor id: a rule with a body condition may apply to this vendor.
    pub vendors: Vec<bool>,
    /// A body rule names no vendor: every request with a body is inspected.
    pub any_vendor: bool,
}

impl std::fmt::Debug for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspection")
            .field("patterns", &self.scanner.len())
            .field("max_body", &self.max_body)
            .field("models", &self.models)
            .finish()
    }
}

impl Inspection {
    /// Whether a request to this vendor should have its body read before deciding.
    pub fn wanted(&self, vendor: Option<VendorId>) -> bool {
        (self.models || self.dlp != 0)
            && (self.any_vendor
                || vendor.is_some_and(|v| self.vendors.get(v as usize).copied().unwrap_or(false)))
    }
}

/// What inspection found, as the policy matches on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyFacts<'a> {
    /// The JSON body's top-level `model`, lowercased.
    pub model: Option<&'a str>,
    /// Bit set of DLP pattern indices found.
    pub dlp: u64,
}
