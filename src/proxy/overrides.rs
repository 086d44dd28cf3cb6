//! Fields and parameters that ask some origins for another method or path than the request
//! line's: rules must match what the origin will act on, so these are read before deciding.

use http::header::{HeaderName, HeaderValue};
use http::Method;

/// The method a method-override field names (`X-HTTP-Method-Override`, `X-HTTP-Method`,
/// `X-Method-Override`), in upper case as rules name them.
pub fn overriding_method((name, value): (&HeaderName, &HeaderValue)) -> Option<Method> {
    // By length first: the usual request has none of these, and most names are other lengths.
    let n = name.as_str();
    if !matches!(n.len(), 13 | 17 | 22) || !n.starts_with("x-") {
        return None;
    }
    if !matches!(
        n,
        "x-http-method" | "x-method-override" | "x-http-method-override"
    ) {
        return None;
    }
    let v = value.as_bytes().trim_ascii();
    Method::from_bytes(&v.to_ascii_uppercase()).ok()
}

/// The path an `X-Original-URL` or `X-Rewrite-URL` field names (origin-form), which some
/// servers route on instead of the request line's.
pub fn overriding_path<'a>((name, value): (&HeaderName, &'a HeaderValue)) -> Option<&'a str> {
    let n = name.as_str();
    if !matches!(n.len(), 13 | 14) || !matches!(n, "x-original-url" | "x-rewrite-url") {
        return None;
    }
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// The method a `_method` query parameter names (percent-decoded, upper case).
pub fn method_parameter(query: &str) -> Option<Method> {
    // One memchr for the usual query, which names none.
    if !query.contains("method") {
        return None;
    }
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        let name = percent_encoding::percent_decode_str(name)
            .decode_utf8()
            .ok()?;
        if name != "_method" {
            return None;
        }
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .ok()?;
        Method::from_bytes(value.trim().to_ascii_uppercase().as_bytes()).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &'static str, value: &'static str) -> (HeaderName, HeaderValue) {
        (
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        )
    }

    #[test]
    fn each_override_field_names_a_method_in_any_case_and_others_name_none() {
        for name in [
            "x-http-method",
            "x-method-override",
            "x-http-method-override",
        ] {
            let (n, v) = field(name, " delete ");
            assert_eq!(overriding_method((&n, &v)), Some(Method::DELETE), "{name}");
        }
        for name in [
            "x-http-methods",
            "x-original-url",
            "content-length",
            "x-method",
        ] {
            let (n, v) = field(name, "DELETE");
            assert_eq!(overriding_method((&n, &v)), None, "{name}");
        }
    }

    #[test]
    fn rewrite_fields_name_origin_form_paths_only() {
        let (n, v) = field("x-original-url", " /v1/batches ");
        assert_eq!(overriding_path((&n, &v)), Some("/v1/batches"));
        let (n, v) = field("x-rewrite-url", "/v1/files?x=1");
        assert_eq!(overriding_path((&n, &v)), Some("/v1/files?x=1"));
        let (n, v) = field("x-original-url", "http://other/v1");
        assert_eq!(overriding_path((&n, &v)), None, "not origin-form");
        let (n, v) = field("x-forwarded-url", "/v1/batches");
        assert_eq!(overriding_path((&n, &v)), None);
    }

    #[test]
    fn the_method_parameter_is_found_decoded_among_others() {
        assert_eq!(method_parameter("_method=delete"), Some(Method::DELETE));
        assert_eq!(method_parameter("a=1&%5Fmethod=%50UT"), Some(Method::PUT));
        assert_eq!(method_parameter("a=1&method=DELETE"), None, "another name");
        assert_eq!(method_parameter("a=1&b=2"), None);
    }
}
