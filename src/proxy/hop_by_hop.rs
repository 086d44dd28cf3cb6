//! Fields that belong to one connection, not to the exchange (RFC 9110 §7.6.1): removed from
//! what passes the proxy in either direction, and our own `Via` added in their place.

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;

const VIA: &str = "1.1 portcullis";

/// RFC 9110 §7.6.1: connection-specific fields, and any the Connection header names, are for
/// one hop only. `Proxy-Authorization` is ours and never goes upstream.
///
/// `Trailer` is not one of them (RFC 9110 §6.6.2): it lists the trailer fields to come, and
/// hyper's HTTP/1.1 server sends only the trailer fields it names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes [`HOP_BY_HOP`] fields and those the Connection header names. Runs twice per
/// exchange, so it looks before it removes: one pass over the names present, then a removal
/// (a hash and a probe each) only for what is there.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut present = 0u16;
    for name in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let usual = |v: &HeaderValue| {
        let b = v.as_bytes();
        b.eq_ignore_ascii_case(b"keep-alive") || b.eq_ignore_ascii_case(b"close")
    };
    if present & 1 != 0 && !h.get_all(header::CONNECTION).iter().all(usual) {
        // Only names actually present are kept, so the usual `keep-alive` / `close` allocate
        // nothing.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name no header: not worth a header-name parse.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(n) && h.contains_key(n))
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    // `TE: trailers` says the sender takes trailer fields; this hop does (it relays them: to
    // an HTTP/1.1 client, those the answer's `Trailer` field names), so it says so to the next. gRPC origins refuse a request without
    // it (its "detect incompatible proxies" check), and some send no trailers at all.
    let trailers = present & TE_BIT != 0
        && h.get_all(header::TE).iter().any(|v| {
            v.as_bytes().split(|&b| b == b',').any(|t| {
                t.split(|&b| b == b';')
                    .next()
                    .unwrap_or(t)
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"trailers")
            })
        });
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// [`HOP_BY_HOP`]'s `TE`, as a bit of `present`.
const TE_BIT: u16 = 1 << 5;

/// Adds this hop's `Via` (RFC 9110 §7.6.3), on requests and answers alike.
pub fn append_via(h: &mut HeaderMap) {
    // A field of its own (RFC 9110 §5.3: the same as joining with commas), so earlier hops'
    // fields stay as they came and the usual case costs one hash and probe.
    h.append(header::VIA, HeaderValue::from_static(VIA));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed_including_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("te", "gzip;q=0.5".parse().unwrap());
        h.insert("authorization", "Bearer x".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn te_trailers_is_said_again_and_nothing_else_of_te_passes() {
        assert_eq!(HOP_BY_HOP[TE_BIT.trailing_zeros() as usize], header::TE);
        for (sent, kept) in [
            ("trailers", true),
            ("gzip, Trailers", true),
            ("deflate;q=0.5, trailers;q=1", true),
            ("gzip", false),
            ("trailersx", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert("te", sent.parse().unwrap());
            h.insert("connection", "TE".parse().unwrap());
            strip_hop_by_hop(&mut h);
            let te: Vec<_> = h.get_all("te").iter().collect();
            match kept {
                true => assert_eq!(te, ["trailers"], "{sent}"),
                false => assert!(te.is_empty(), "{sent}"),
            }
            assert!(!h.contains_key("connection"), "{sent}");
        }
    }

    #[test]
    fn hop_by_hop_strip_leaves_end_to_end_fields_and_handles_every_listed_name() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-request-id", "7".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "nothing hop-by-hop: untouched");

        h.append("connection", "keep-alive".parse().unwrap());
        h.append("connection", " X-Request-Id ,upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("trailer", "x-sum".parse().unwrap());
        h.insert("proxy-authenticate", "Basic".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("content-type"));
        // End to end: it names the trailer fields that follow the body.
        assert_eq!(h["trailer"], "x-sum");
    }
}
