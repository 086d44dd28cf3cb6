//! The configuration file as written: serde types only. Unknown keys are errors everywhere, and
//! every value that validation may reject keeps its span so the error can name line and column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

/// A string or a list of strings: `vendor = "openai"` or `vendor = ["openai", "anthropic"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub include: Vec<S<String>>,
    pub proxy: Option<S<ProxySection>>,
    pub admin: Option<S<AdminSection>>,
    pub audit: Option<S<AuditSection>>,
    pub upstream: Option<S<UpstreamSection>>,
    pub auth: Option<S<AuthSection>>,
    pub log: Option<S<LogSection>>,
    pub bulk: Option<S<BulkSection>>,
    /// Named limits, reused by rules: `[limits.openai-bulk]`. Not spanned: toml cannot span a
    /// table that only dotted headers create; errors find the header in the text instead.
    pub limits: Option<BTreeMap<String, LimitDef>>,
    pub limit_store: Option<S<LimitStoreSection>>,
    pub intercept: Option<S<InterceptSection>>,
    pub inspect: Option<S<InspectSection>>,
    pub keys: Option<S<KeysSection>>,
    pub defaults: Option<S<DefaultsSection>>,
    pub groups: Option<S<BTreeMap<String, Vec<String>>>>,
    #[serde(default)]
    pub vendor: Vec<S<VendorDef>>,
    #[serde(default)]
    pub rule: Vec<S<RuleDef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub listen: Option<S<String>>,
    pub connect_ports: Option<S<Vec<u16>>>,
    pub header_read_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub client_hello_timeout: Option<S<String>>,
    pub shutdown_grace: Option<S<String>>,
    pub max_header_bytes: Option<S<u64>>,
    pub max_connections: Option<S<u64>>,
    pub tunnel_require_tls: Option<bool>,
    pub max_connections_per_client: Option<S<u64>>,
    pub body_timeout: Option<S<String>>,
    pub send_timeout: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<S<String>>,
    pub token_file: Option<S<String>>,
    pub pac: Option<S<String>>,
    pub pac_proxy: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkSection {
    pub enabled: Option<bool>,
    pub window: Option<S<String>>,
    pub max_requests: Option<S<u64>>,
    pub max_bytes: Option<S<String>>,
    pub max_distinct_keys: Option<S<u64>>,
    pub max_bulk_requests: Option<S<u64>>,
    pub max_principals: Option<S<u64>>,
    pub top_n: Option<S<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    pub path: Option<S<String>>,
    pub queue: Option<S<u64>>,
    pub max_size: Option<S<String>>,
    pub keep: Option<S<u64>>,
    pub on_full: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub resolve: Option<S<BTreeMap<String, S<String>>>>,
    pub allow_private: Option<S<Vec<S<String>>>>,
    pub ca_file: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub response_timeout: Option<S<String>>,
    pub pool_idle_timeout: Option<S<String>>,
    pub pool_max_idle_per_host: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub htpasswd: S<String>,
    pub realm: Option<String>,
    pub required: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    pub action: Option<S<String>>,
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorDef {
    pub id: S<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub hosts: Vec<S<String>>,
    #[serde(default)]
    pub app_hosts: Vec<S<String>>,
    /// Path patterns ending in `/{model}`: the segment there names the model.
    #[serde(default)]
    pub model_paths: Vec<S<String>>,
    /// Paths whose bodies name models deeper than the top-level `model`.
    #[serde(default)]
    pub model_fields: Vec<ModelFieldDef>,
    pub endpoints: Option<S<BTreeMap<String, Vec<S<String>>>>>,
}

/// `{ path = "/v1/messages/batches", field = "requests[].params.model" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFieldDef {
    pub path: S<String>,
    pub field: S<String>,
    /// The body is JSON Lines (a file of batch requests), alone or as a multipart upload's
    /// file: `field` is read in each line.
    #[serde(default)]
    pub lines: bool,
    /// Values of `field` saying the models are sent where they cannot be read: refused where
    /// a model rule is in play (`{ path = "/v1/uploads", field = "purpose", unreadable_when =
    /// ["batch"] }`).
    #[serde(default)]
    pub unreadable_when: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub id: S<String>,
    pub action: S<String>,
    pub mode: Option<S<String>>,
    pub reason: Option<String>,
    pub vendor: Option<S<OneOrMany<String>>>,
    pub host: Option<S<OneOrMany<String>>>,
    pub endpoint: Option<S<OneOrMany<String>>>,
    pub path: Option<S<OneOrMany<String>>>,
    pub method: Option<S<OneOrMany<String>>>,
    pub port: Option<S<OneOrMany<u16>>>,
    pub client: Option<S<OneOrMany<String>>>,
    pub user: Option<S<OneOrMany<String>>>,
    pub group: Option<S<OneOrMany<String>>>,
    /// A table, the name of a `[limits.NAME]`, or a list of either; read by hand (see
    /// `compile`) so a bad key inside gets a precise message.
    pub limit: Option<S<toml::Value>>,
    /// Conditions that need the inside of a request (plain HTTP or intercepted): the JSON
    /// body's `model` (globs) and DLP pattern names found in the body.
    pub model: Option<S<OneOrMany<String>>>,
    pub dlp: Option<S<OneOrMany<String>>>,
    /// Tenant restriction: a request this rule lets through must carry one of these key
    /// fingerprints / organisation or project ids, else it is blocked.
    pub require_key: Option<S<OneOrMany<String>>>,
    pub require_org: Option<S<OneOrMany<String>>>,
    /// Headers set (replacing the client's) on requests this rule lets through.
    pub set_headers: Option<S<BTreeMap<String, S<String>>>>,
}

/// `{ requests = 50, per = "1m", burst = 10, bytes = "500MiB", concurrent = 4, by = "client" }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDef {
    pub requests: Option<u64>,
    pub per: Option<String>,
    pub burst: Option<u64>,
    pub bytes: Option<String>,
    pub concurrent: Option<u64>,
    pub by: Option<OneOrMany<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitStoreSection {
    /// "memory" (default) or "redis"
    pub kind: Option<S<String>>,
    pub url: Option<S<String>>,
    /// "allow" (default) or "deny" while Redis cannot answer
    pub on_store_error: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub max_keys: Option<S<u64>>,
}

/// TLS interception: tunnels to these vendors and hosts are opened with a leaf from the org CA.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptSection {
    pub ca_cert: S<String>,
    pub ca_key: S<String>,
    pub vendors: Option<S<Vec<S<String>>>>,
    pub hosts: Option<S<Vec<S<String>>>>,
    /// Hosts of listed vendors that stay opaque (clients that pin certificates).
    pub exclude: Option<S<Vec<S<String>>>>,
    pub leaf_cache: Option<S<u64>>,
    pub leaf_validity: Option<S<String>>,
}

/// Request-body inspection for DLP and model rules.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectSection {
    pub max_body: Option<S<String>>,
    pub max_buffered: Option<S<String>>,
    pub timeout: Option<S<String>>,
    /// What a DLP rule does with a body longer than `max_body`: `"pass"` (the prefix is
    /// scanned, the rest streams on unread) or `"block"` (refused, fail closed).
    pub dlp_past_max_body: Option<S<String>>,
    /// User DLP patterns: name = regex.
    pub patterns: Option<S<BTreeMap<String, S<String>>>>,
}

/// API-key fingerprints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// The HMAC secret; without it fingerprints are stable for one process only.
    pub secret_file: Option<S<String>>,
}
