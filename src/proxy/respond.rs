//! Responses the proxy makes itself: 403 blocked, 407, 4xx/5xx errors. JSON by default, an HTML
//! page when the client asks for `text/html` (a browser user deserves a readable page).

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, PROXY_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{Either, Full};
use serde_json::json;

use super::body::ProxyBody;
use crate::error::ProxyError;
use crate::policy::Decision;

pub const RULE_HEADER: &str = "x-portcullis-rule";
pub const VENDOR_HEADER: &str = "x-portcullis-vendor";

pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("text/html")))
}

fn build(
    status: StatusCode,
    html: bool,
    body: serde_json::Value,
    title: &str,
) -> Response<ProxyBody> {
    let (ctype, bytes) = if html {
        (
            "text/html; charset=utf-8",
            Bytes::from(html_page(status, title, &body)),
        )
    } else {
        let mut v = serde_json::to_vec(&body).unwrap_or_default();
        v.push(b'\n');
        ("application/json", Bytes::from(v))
    };
    let mut resp = Response::new(Either::Left(Full::new(bytes)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn html_page(status: StatusCode, title: &str, body: &serde_json::Value) -> String {
    let field = |k: &str| escape(body.get(k).and_then(|v| v.as_str()).unwrap_or(""));
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body>\
         <h1>{t}</h1><p>{reason}</p><dl><dt>Vendor</dt><dd>{vendor}</dd><dt>Rule</dt><dd>{rule}</dd>\
         <dt>Status</dt><dd>{status}</dd></dl><p>Blocked by your organisation's AI-use policy (portcullis).</p>\
         </body></html>\n",
        t = escape(title),
        reason = field("reason"),
        vendor = field("vendor"),
        rule = field("rule"),
        status = status.as_u16(),
    )
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn add_policy_headers(resp: &mut Response<ProxyBody>, rule: Option<&str>, vendor: Option<&str>) {
    let h = resp.headers_mut();
    if let Some(v) = rule.and_then(|r| HeaderValue::from_str(r).ok()) {
        h.insert(RULE_HEADER, v);
    }
    if let Some(v) = vendor.and_then(|r| HeaderValue::from_str(r).ok()) {
        h.insert(VENDOR_HEADER, v);
    }
}

/// 403 for a request or CONNECT that the policy blocks.
pub fn blocked(d: &Decision<'_>, html: bool) -> Response<ProxyBody> {
    blocked_because(d, d.reason, html)
}

/// 403 under a decision's rule, for a reason of its own (a tenant restriction not met).
pub fn blocked_because(d: &Decision<'_>, reason: &str, html: bool) -> Response<ProxyBody> {
    let rule = d.rule_id().map(|r| &**r);
    let vendor = d.vendor_id().map(|v| &**v);
    let body = json!({
        "error": "blocked_by_policy",
        "rule": rule,
        "vendor": vendor,
        "reason": reason,
    });
    let mut resp = build(StatusCode::FORBIDDEN, html, body, "Blocked by policy");
    add_policy_headers(&mut resp, Some(rule.unwrap_or("default")), vendor);
    resp
}

/// 429 for a request or CONNECT over one of its rule's limits; 503 when the limit store cannot
/// answer and `on_store_error = "deny"`.
pub fn limited(
    d: &Decision<'_>,
    refused: &super::limit::Refused,
    html: bool,
) -> Response<ProxyBody> {
    let rule = d.rule_id().map(|r| &**r);
    let vendor = d.vendor_id().map(|v| &**v);
    let (status, error, title) = if refused.store_unavailable {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "limit_store_unavailable",
            "Limit store unavailable",
        )
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Rate limited by policy",
        )
    };
    let body = json!({
        "error": error,
        "rule": rule,
        "vendor": vendor,
        "limit": &*refused.limit,
        "retry_after": refused.retry_after,
        "reason": &**d.reason,
    });
    let mut resp = build(status, html, body, title);
    add_policy_headers(&mut resp, Some(rule.unwrap_or("default")), vendor);
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(refused.retry_after),
    );
    resp
}

/// The response for a request-path error; 407 carries the challenge.
pub fn error(e: &ProxyError, realm: Option<&str>, html: bool) -> Response<ProxyBody> {
    let status = e.status();
    let body = json!({ "error": e.kind(), "reason": e.client_reason() });
    let title = status.canonical_reason().unwrap_or("Error");
    let mut resp = build(status, html, body, title);
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        let realm = realm.unwrap_or("portcullis").replace('"', "");
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
        {
            resp.headers_mut().insert(PROXY_AUTHENTICATE, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        let body = json!({"reason": "<script>x</script>", "vendor": "a&b", "rule": "r"});
        let page = html_page(StatusCode::FORBIDDEN, "Blocked", &body);
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>"));
    }
}
