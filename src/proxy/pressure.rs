//! Admission under audit pressure: with `[audit] on_full = "block"`, a request or CONNECT is
//! refused (503 `audit_unavailable`) while the audit writer cannot keep up or its sink fails,
//! rather than served unaudited. One atomic load on the request path.

use super::State;
use crate::error::ProxyError;

impl State {
    /// `Err(AuditUnavailable)` while the audit log refuses new work; counted. Not audited
    /// itself: the sink that would take the record is the one that is full.
    pub fn audit_admits(&self) -> Result<(), ProxyError> {
        if self.audit.admitting() {
            return Ok(());
        }
        self.metrics.audit_refused.inc();
        Err(ProxyError::AuditUnavailable)
    }
}
