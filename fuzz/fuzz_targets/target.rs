//! Target normalisation: hosts, CONNECT authorities, absolute URIs and paths, then a decision.
//!
//! Invariants checked on every input (all of them are what the policy relies on):
//! - the canonical host is a fixpoint: parsing its printed form gives the same host;
//! - where the WHATWG URL parser (the `url` crate, what browsers and most clients implement)
//!   and ours both accept a host, they agree on what it is: a disagreement is a bypass;
//! - a CONNECT authority, printed back, parses to the same (host, port), and an absolute URI
//!   with the same authority names the same host and port;
//! - the path normal form starts with '/', has no empty or dot segments, is a fixpoint when the
//!   input's escapes are well formed, and a path pattern matches its own path;
//! - `Policy::decide` never panics and gives a spelling the same decision as its canonical host.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::OnceLock;

use http::Method;
use libfuzzer_sys::fuzz_target;
use portcullis::policy::path::{normalize, PathPattern};
use portcullis::policy::target::{from_connect_authority, from_uri, Host};
use portcullis::policy::{Policy, Request};

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.toml");
        portcullis::config::load(&file)
            .expect("fuzz/policy.toml loads")
            .policy
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    host(s);
    authority(s);
    path(s);
});

fn host(s: &str) {
    let parsed = Host::parse(s);
    if let Ok(h) = &parsed {
        let printed = h.to_string();
        assert_eq!(
            Host::parse(&printed).as_ref(),
            Ok(h),
            "{s:?} -> {printed:?}"
        );
        match h {
            Host::Name(n) => {
                assert!(n.len() <= 253 && !n.ends_with('.'), "{n:?}");
                assert!(n
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)));
            }
            Host::Ip(IpAddr::V6(v6)) => assert!(v6.to_ipv4_mapped().is_none(), "{v6}"),
            Host::Ip(IpAddr::V4(_)) => {}
        }
        let canonical = Host::parse(&printed).unwrap();
        same_decision(h, &canonical, s);
        // Spellings every client treats as the same host.
        if !s.contains('%') && !s.starts_with('[') {
            let upper = s.to_ascii_uppercase();
            agree_or_refuse(&upper, h);
            let encoded: String = s
                .chars()
                .map(|c| match c {
                    'a'..='z' | 'A'..='Z' | '0'..='9' => format!("%{:02X}", c as u32),
                    c => c.to_string(),
                })
                .collect();
            agree_or_refuse(&encoded, h);
        }
    }
    whatwg(s, &parsed);
}

/// A variant spelling may be refused, but never accepted as a different host.
fn agree_or_refuse(variant: &str, expected: &Host) {
    if let Ok(h) = Host::parse(variant) {
        assert_eq!(&h, expected, "{variant:?}");
    }
}

fn whatwg(s: &str, ours: &Result<Host, portcullis::policy::target::TargetError>) {
    let Ok(ours) = ours else {
        return; // refusing is always safe
    };
    let bracketed = s.starts_with('[') && s.ends_with(']');
    // Characters that end or restructure the authority inside a URL; the host alone is compared.
    let structural = |c: char| {
        matches!(c, '/' | '\\' | '?' | '#' | '@' | '[' | ']' | ':')
            || c.is_ascii_control()
            || c == ' '
    };
    if !bracketed && s.contains(structural) {
        return;
    }
    if bracketed && s[1..s.len() - 1].contains(|c: char| structural(c) && c != ':') {
        return;
    }
    let Ok(u) = url::Url::parse(&format!("http://{s}/")) else {
        return;
    };
    let theirs = match u.host() {
        Some(url::Host::Domain(d)) => Host::Name(d.strip_suffix('.').unwrap_or(d).into()),
        Some(url::Host::Ipv4(a)) => Host::Ip(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => Host::from_ip(IpAddr::V6(a)),
        None => return,
    };
    // An empty-label name ("a..b") is a Domain to WHATWG and refused by us, so no mismatch there.
    assert_eq!(
        ours, &theirs,
        "host {s:?}: ours {ours:?}, WHATWG {theirs:?}"
    );
}

fn authority(s: &str) {
    if let Ok((h, port)) = from_connect_authority(s) {
        let printed = match h {
            Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            ref other => format!("{other}:{port}"),
        };
        assert_eq!(
            from_connect_authority(&printed),
            Ok((h.clone(), port)),
            "{s:?} -> {printed:?}"
        );
        if let Ok(uri) = format!("https://{s}/").parse::<http::Uri>() {
            if let Ok(t) = from_uri(&uri) {
                assert_eq!((t.host, t.port), (h, port), "{s:?}");
            }
        }
    }
    if let Ok(uri) = s.parse::<http::Uri>() {
        if let Ok(t) = from_uri(&uri) {
            let again: http::Uri = format!("{t}/").parse().expect("a target prints as a URI");
            assert_eq!(from_uri(&again), Ok(t.clone()), "{s:?}");
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            for method in [Method::GET, Method::POST] {
                let req = request(&t.host, t.port, Some(path), &method);
                let _ = policy().decide(&req);
            }
        }
    }
}

fn path(s: &str) {
    let n = normalize(s);
    assert!(n.starts_with('/'), "{s:?} -> {n:?}");
    for seg in n.split('/').skip(1) {
        // The last segment is empty only for a trailing slash.
        assert!(seg != "." && seg != "..", "{s:?} -> {n:?}");
    }
    assert!(!n.contains("//"), "{s:?} -> {n:?}");
    if let Ok(p) = PathPattern::parse(s) {
        assert!(
            p.matches(&n),
            "pattern {s:?} does not match its own path {n:?}"
        );
    }
    if !well_formed_escapes(s) {
        return;
    }
    assert_eq!(normalize(&n), n, "not idempotent: {s:?}");
    // Decide with a fixed vendor host and this path: same decision as the normal form.
    let host = Host::parse("api.openai.com").unwrap();
    let m = Method::POST;
    let a = policy().decide(&request(&host, 443, Some(s), &m));
    let b = policy().decide(&request(&host, 443, Some(&n), &m));
    assert_eq!(
        (a.rule_id(), a.action, a.endpoint),
        (b.rule_id(), b.action, b.endpoint),
        "{s:?} vs {n:?}"
    );
}

/// Every '%' starts a two-hex-digit escape. With a stray '%' a single decoding pass can build
/// a new escape ("%%32e" -> "%2e"), so a second pass would decode what the origin never will.
fn well_formed_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().all(|(i, &c)| {
        c != b'%'
            || (b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

fn request<'a>(
    host: &'a Host,
    port: u16,
    path: Option<&'a str>,
    method: &'a Method,
) -> Request<'a> {
    Request {
        client: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        user: None,
        method,
        host,
        port,
        path,
        body: Default::default(),
    }
}

fn same_decision(spelled: &Host, canonical: &Host, s: &str) {
    let m = Method::GET;
    for path in [None, Some("/v1/batches")] {
        let a = policy().decide(&request(spelled, 443, path, &m));
        let b = policy().decide(&request(canonical, 443, path, &m));
        assert_eq!(
            (a.rule_id(), a.action, a.vendor_id()),
            (b.rule_id(), b.action, b.vendor_id()),
            "{s:?}"
        );
    }
}
