//! Fields and parameters that ask some origins for another method or path than the request
//! line's: rules must match what the origin will act on, so these are read before deciding.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};

/// Another reading of a request: a method, a path, or both, as an origin may act on them.
pub type Reading<'a> = (Option<Method>, Option<&'a str>);
/// A [`Reading`] kept beyond its request (an open WebSocket's, for a reload's decision).
pub type OwnedReading = (Option<Method>, Option<Box<str>>);

/// More different readings than any honest request names: each costs a decision, so a
/// request naming more is refused rather than decided thousands of times.
pub const MAX_READINGS: usize = 16;

/// Every other method and path the request's fields and `_method` parameters name, each once,
/// for the decision to cover each. Empty (and unallocated) for the usual request, which names
/// none. `Err` when it names more than [`MAX_READINGS`].
pub fn named_overrides<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Vec<Reading<'a>>, TooManyReadings> {
    let mut named = Vec::new();
    let mut add = |reading: Reading<'a>| {
        if !named.contains(&reading) {
            named.push(reading);
        }
        named.len() <= MAX_READINGS
    };
    for field in headers {
        let fits = match (method_field(field), overriding_path(field)) {
            (Some(list), _) => methods_in(list).all(|m| add((Some(m), None))),
            (None, Some(path)) => add((None, Some(path))),
            (None, None) => true,
        };
        if !fits {
            return Err(TooManyReadings);
        }
    }
    if let Some(query) = query {
        if !method_parameters(query)
            .into_iter()
            .all(|m| add((Some(m), None)))
        {
            return Err(TooManyReadings);
        }
    }
    Ok(named)
}

/// A request naming more than [`MAX_READINGS`] other methods and paths.
#[derive(Debug)]
pub struct TooManyReadings;

/// The value of a method-override field (`X-HTTP-Method-Override`, `X-HTTP-Method`,
/// `X-Method-Override`).
fn method_field<'a>((name, value): (&HeaderName, &'a HeaderValue)) -> Option<&'a [u8]> {
    // By length first: the usual request has none of these, and most names are other lengths.
    let n = name.as_str();
    if !matches!(n.len(), 13 | 17 | 22) || !n.starts_with("x-") {
        return None;
    }
    matches!(
        n,
        "x-http-method" | "x-method-override" | "x-http-method-override"
    )
    .then_some(value.as_bytes())
}

/// Each method a value names, in upper case as rules name them. A list (`DELETE, GET`) names
/// each of its items: Express's method-override takes the first, other readers the last or
/// the whole, so every one is decided. Items that are no method token are skipped.
fn methods_in(list: &[u8]) -> impl Iterator<Item = Method> + '_ {
    list.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
        .filter_map(|item| Method::from_bytes(&item.to_ascii_uppercase()).ok())
}

/// The path an `X-Original-URL` or `X-Rewrite-URL` field names, which some servers route on
/// instead of the request line's: origin-form, or the path of an absolute URL
/// (`https://api.openai.com/v1/batches`), which servers that accept one route on the same way.
fn overriding_path<'a>((name, value): (&HeaderName, &'a HeaderValue)) -> Option<&'a str> {
    let n = name.as_str();
    if !matches!(n.len(), 13 | 14) || !matches!(n, "x-original-url" | "x-rewrite-url") {
        return None;
    }
    let v = value.to_str().ok()?.trim();
    if v.starts_with('/') {
        return Some(v);
    }
    let (scheme, rest) = v.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    Some(match rest.find(['/', '?', '#']) {
        Some(at) if rest.as_bytes()[at] == b'/' => &rest[at..],
        // `https://host` or `https://host?q`: the root.
        _ => "/",
    })
}

/// `_method`, percent-decoded, or as PHP reads a name into `$_GET` (Laravel, Symfony): a
/// leading `.`, space, `+` (a space in a query) or `[` becomes `_`, so `.method` is `_method`.
fn is_method_parameter(name: &str) -> bool {
    let name: Vec<u8> = percent_encoding::percent_decode_str(name).collect();
    name.len() == 7
        && matches!(name[0], b'_' | b'.' | b' ' | b'+' | b'[')
        && &name[1..] == b"method"
}

/// The methods `_method` query parameters name (percent-decoded): every such parameter, as
/// frameworks differ on which of several they take, split on `&` and `;` alike.
fn method_parameters(query: &str) -> Vec<Method> {
    let mut named = Vec::new();
    // One memchr for the usual query, which names none.
    if !query.contains("method") {
        return named;
    }
    for pair in query.split(['&', ';']) {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        if is_method_parameter(name) {
            let value: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
            named.extend(methods_in(&value));
        }
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(fields: &[(&'static str, &'static str)], query: Option<&str>) -> Vec<String> {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(*name, HeaderValue::from_static(value));
        }
        named_overrides(&h, query)
            .expect("a few readings")
            .into_iter()
            .map(|(m, p)| match (m, p) {
                (Some(m), None) => m.to_string(),
                (None, Some(p)) => p.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn each_override_field_names_a_method_in_any_case_and_others_name_none() {
        for name in [
            "x-http-method",
            "x-method-override",
            "x-http-method-override",
        ] {
            assert_eq!(named(&[(name, " delete ")], None), ["DELETE"], "{name}");
        }
        for name in [
            "x-http-methods",
            "x-original-method",
            "content-length",
            "x-method",
        ] {
            assert!(named(&[(name, "DELETE")], None).is_empty(), "{name}");
        }
    }

    #[test]
    fn every_item_of_a_list_and_every_field_is_a_method_named() {
        let fields = [("x-http-method-override", "DELETE, get,,POST")];
        assert_eq!(named(&fields, None), ["DELETE", "GET", "POST"]);
        let fields = [("x-http-method", "PUT"), ("x-http-method", "delete")];
        assert_eq!(named(&fields, None), ["PUT", "DELETE"]);
        let fields = [("x-http-method", "DEL ETE, (x)")];
        assert!(named(&fields, None).is_empty(), "no method tokens");
    }

    #[test]
    fn each_reading_counts_once_and_too_many_are_refused() {
        let repeated = ["DELETE"; 1000].join(",");
        let mut h = HeaderMap::new();
        h.insert("x-http-method-override", repeated.parse().unwrap());
        assert_eq!(named_overrides(&h, None).expect("one reading").len(), 1);
        let many: Vec<String> = (0..=MAX_READINGS).map(|i| format!("M{i}")).collect();
        h.insert("x-http-method-override", many.join(",").parse().unwrap());
        assert!(named_overrides(&h, None).is_err());
        let query = many
            .iter()
            .map(|m| format!("_method={m}"))
            .collect::<Vec<_>>()
            .join("&");
        assert!(named_overrides(&HeaderMap::new(), Some(&query)).is_err());
    }

    #[test]
    fn rewrite_fields_name_paths_origin_form_or_absolute() {
        let cases = [
            ("x-original-url", " /v1/batches ", Some("/v1/batches")),
            ("x-rewrite-url", "/v1/files?x=1", Some("/v1/files?x=1")),
            // Symfony (and IIS) take the path of an absolute URL here.
            ("x-original-url", "http://other/v1", Some("/v1")),
            (
                "x-original-url",
                "https://api.openai.com/v1/batches?a=b",
                Some("/v1/batches?a=b"),
            ),
            ("x-rewrite-url", "HTTPS://api.openai.com", Some("/")),
            (
                "x-rewrite-url",
                "https://api.openai.com?x=/v1/files",
                Some("/"),
            ),
            ("x-original-url", "v1/batches", None),
            ("x-original-url", "://api.openai.com/v1/batches", None),
            ("x-original-url", "a b://h/v1/batches", None),
            ("x-forwarded-url", "/v1/batches", None),
        ];
        for (name, value, want) in cases {
            let got = named(&[(name, value)], None);
            assert_eq!(got.first().map(String::as_str), want, "{name}: {value}");
        }
    }

    #[test]
    fn every_method_parameter_is_found_decoded_among_others() {
        assert_eq!(named(&[], Some("_method=delete")), ["DELETE"]);
        assert_eq!(named(&[], Some("a=1&%5Fmethod=%50UT")), ["PUT"]);
        assert_eq!(
            named(&[], Some("_method=GET&_method=DELETE;_method=put,post")),
            ["GET", "DELETE", "PUT", "POST"]
        );
        for php in [
            ".method=DELETE",
            "+method=DELETE",
            "%20method=DELETE",
            "[method=DELETE",
        ] {
            assert_eq!(named(&[], Some(php)), ["DELETE"], "{php}");
        }
        assert!(
            named(&[], Some("a=1&method=DELETE")).is_empty(),
            "another name"
        );
        assert!(
            named(&[], Some("a=1&xmethod=DELETE")).is_empty(),
            "another name"
        );
        assert!(named(&[], Some("a=1&b=2")).is_empty());
    }
}
