//! The one error type of the request path. Each variant's [`ProxyError::kind`] is the audit
//! `reason` prefix and the `portcullis_upstream_errors_total{kind}` label, and decides the
//! status the client sees.

use http::StatusCode;

use crate::policy::target::TargetError;
use crate::tls::sni::SniError;
use crate::upstream::guard::GuardDenied;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request target: {0}")]
    Target(#[from] TargetError),
    #[error("origin-form request: this is a proxy, send an absolute URI (http://host/path)")]
    NotProxyRequest,
    #[error("proxy authentication required")]
    AuthRequired,
    #[error("CONNECT to port {0} is not allowed")]
    PortNotAllowed(u16),
    #[error("DNS lookup failed: {0}")]
    Dns(String),
    #[error("no address for host")]
    NoAddress,
    #[error(transparent)]
    AddressDenied(#[from] GuardDenied),
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("upstream TLS failed: {0}")]
    Tls(String),
    #[error("upstream did not answer in time")]
    ResponseTimeout,
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("more than one Host header (RFC 9112 §3.2)")]
    DuplicateHost,
    #[error("transfer coding {0:?} is not supported; only chunked")]
    UnsupportedTransferCoding(String),
    #[error("the request body from the client was malformed or cut: {0}")]
    ClientBody(String),
    #[error("TLS ClientHello: {0}")]
    ClientHello(SniError),
    #[error("ClientHello did not arrive in time")]
    ClientHelloTimeout,
    #[error("misdirected request: {0}")]
    Misdirected(String),
    #[error("the request body stalled: no bytes from the client for body_timeout")]
    ClientBodyTimeout,
    /// Same kind as [`ProxyError::ClientBodyTimeout`]: the client was too slow with its body,
    /// here for the wait the rules allow, which a streaming upload can be inside of.
    #[error("the part of the request body the rules read ([inspect] max_body) did not arrive within [inspect] timeout; refusing rather than forwarding it uninspected")]
    InspectionTimeout,
    #[error("the response head from the origin is too large")]
    ResponseHeadTooLarge,
    #[error("the response body stalled: no bytes from the origin for body_timeout")]
    UpstreamBodyTimeout,
    #[error("the response body from the origin failed mid-way: {0}")]
    UpstreamBody(String),
    #[error("the audit log cannot take records now; refusing rather than serving unaudited")]
    AuditUnavailable,
    #[error("bodies held for inspection fill [inspect] max_buffered; refusing rather than forwarding uninspected")]
    InspectionBusy,
    #[error("the exchange ended before the origin answered (client gone or stream reset)")]
    ClientAborted,
    /// hyper refused the request head before the handler saw it (and answered 400 or 431).
    #[error("malformed request head: {0}")]
    MalformedRequest(String),
    #[error("request head too large: {0}")]
    RequestHeadTooLarge(String),
    /// Part of a request head came and the rest did not within `[proxy] header_read_timeout`:
    /// the connection is closed without an answer, as hyper's own timeout did.
    #[error("no complete request head within header_read_timeout ({0:?})")]
    HeaderReadTimeout(std::time::Duration),
    /// hyper answers a request target over its limit with 414 instead of 431.
    #[error("request target too long: {0}")]
    UriTooLong(String),
    /// Each request inside an intercepted HTTP/2 tunnel can take an upstream connection of
    /// its own, so they count against `[proxy] max_connections_per_client` too.
    #[error("this client already has {0} requests in flight inside intercepted tunnels ([proxy] max_connections_per_client)")]
    TooManyStreams(usize),
}

impl ProxyError {
    /// A stable snake_case name: audit reason, metric label, `"error"` in the response body.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Target(e) => e.kind(),
            ProxyError::NotProxyRequest => "not_proxy_request",
            ProxyError::AuthRequired => "auth_required",
            ProxyError::PortNotAllowed(_) => "port_not_allowed",
            ProxyError::Dns(_) => "dns",
            ProxyError::NoAddress => "dns",
            ProxyError::AddressDenied(_) => "address_denied",
            ProxyError::Connect(_) => "connect",
            ProxyError::ConnectTimeout => "connect_timeout",
            ProxyError::Tls(_) => "tls",
            ProxyError::ResponseTimeout => "timeout",
            ProxyError::Upstream(_) => "upstream",
            ProxyError::ClientBody(_) => "bad_request_body",
            ProxyError::DuplicateHost => "duplicate_host",
            ProxyError::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
            ProxyError::ClientHello(e) => e.kind(),
            ProxyError::ClientHelloTimeout => "client_hello_timeout",
            ProxyError::Misdirected(_) => "misdirected",
            ProxyError::ClientBodyTimeout | ProxyError::InspectionTimeout => "client_body_timeout",
            ProxyError::ResponseHeadTooLarge => "response_head_too_large",
            ProxyError::UpstreamBodyTimeout => "body_timeout",
            ProxyError::UpstreamBody(_) => "upstream_body",
            ProxyError::AuditUnavailable => "audit_unavailable",
            ProxyError::InspectionBusy => "inspection_busy",
            ProxyError::ClientAborted => "client_aborted",
            ProxyError::MalformedRequest(_) => "malformed_request",
            ProxyError::RequestHeadTooLarge(_) => "request_head_too_large",
            ProxyError::UriTooLong(_) => "uri_too_long",
            ProxyError::HeaderReadTimeout(_) => "header_read_timeout",
            ProxyError::TooManyStreams(_) => "too_many_streams",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Target(_)
            | ProxyError::NotProxyRequest
            | ProxyError::ClientBody(_)
            | ProxyError::DuplicateHost
            | ProxyError::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestHeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ProxyError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::PortNotAllowed(_) | ProxyError::AddressDenied(_) => StatusCode::FORBIDDEN,
            ProxyError::ConnectTimeout | ProxyError::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientHello(_) | ProxyError::ClientHelloTimeout => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyTimeout
            | ProxyError::InspectionTimeout
            | ProxyError::HeaderReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamBodyTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::AuditUnavailable | ProxyError::InspectionBusy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // nginx's "client closed request": never sent, only recorded.
            ProxyError::ClientAborted => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ProxyError::ResponseHeadTooLarge
            | ProxyError::UpstreamBody(_)
            | ProxyError::Dns(_)
            | ProxyError::NoAddress
            | ProxyError::Connect(_)
            | ProxyError::Tls(_)
            | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The reason the client is told. The guard's refusal leaves out the address: a client
    /// that names an internal host must not learn what it resolves to (the audit record and
    /// the log keep it).
    pub fn client_reason(&self) -> std::borrow::Cow<'_, str> {
        match self {
            ProxyError::AddressDenied(d) => format!(
                "the destination's address is {} and not allowed",
                d.class.describe()
            )
            .into(),
            e => e.to_string().into(),
        }
    }

    /// Counted in `portcullis_upstream_errors_total`: failures on the way to the origin.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::Dns(_)
                | ProxyError::NoAddress
                | ProxyError::AddressDenied(_)
                | ProxyError::Connect(_)
                | ProxyError::ConnectTimeout
                | ProxyError::Tls(_)
                | ProxyError::ResponseTimeout
                | ProxyError::Upstream(_)
                | ProxyError::ResponseHeadTooLarge
                | ProxyError::UpstreamBodyTimeout
                | ProxyError::UpstreamBody(_)
        )
    }
}
