//! Request-body inspection for intercepted vendor traffic.
//!
//! The proxy buffers at most a configured cap of an intercepted request body,
//! runs these inspectors over that prefix, decides (allow, block, audit), and
//! then streams the body on to the vendor unchanged. Because only a prefix is
//! seen, every inspector here must give a sound answer on truncated input and
//! must cost at most linear time in the prefix length: they sit on the hot
//! request path and an attacker controls the bytes.
//!
//! * [`dlp`] finds which secret/PII patterns occur in the body. Audit records
//!   carry pattern *names* only, never the matched text, so that the audit
//!   log does not become a second copy of the leaked secret.
//! * [`model`] pulls the top-level `"model"` field out of a JSON body so that
//!   policy can be applied per model without a full JSON parse.

pub mod dlp;
pub mod model;
