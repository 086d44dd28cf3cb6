//! Request paths: the normal form rules are matched against, and segment-wise path patterns.
//!
//! Origins treat `/v1/./batches`, `/v1//batches` and `/v1/%62atches` as `/v1/batches`; if the
//! policy did not, a client could dodge a path rule by spelling. Matching therefore runs on the
//! RFC 3986 §6.2.2 normal form (unreserved percent-escapes decoded, dot segments removed) with
//! empty segments collapsed. The request is still forwarded exactly as the client sent it.

use std::borrow::Cow;

use super::hostmatch::glob_match;

/// The path without its query, normalised for matching. Borrows when already normal, which is
/// the common case, so the hot path does not allocate.
pub fn normalize(path_and_query: &str) -> Cow<'_, str> {
    let path = match path_and_query.find(['?', '#']) {
        Some(i) => &path_and_query[..i],
        None => path_and_query,
    };
    if !needs_work(path) {
        return Cow::Borrowed(if path.is_empty() { "/" } else { path });
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || (decoded.ends_with('/') && !out.is_empty()) {
        s.push('/');
    }
    Cow::Owned(s)
}

fn needs_work(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return true;
    }
    b.windows(2).any(|w| w == b"//" || w == b"/.") || b.contains(&b'%')
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                    i += 3;
                    continue;
                }
                // Keep other escapes but in one case, so %2f and %2F compare equal.
                out.extend_from_slice(&[
                    b'%',
                    b[i + 1].to_ascii_uppercase(),
                    b[i + 2].to_ascii_uppercase(),
                ]);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Segments a request path is split into once, on the stack, so that many patterns can be
/// matched without splitting again. Longer paths keep their first `MAX_SEGMENTS`; a pattern
/// longer than that (none is) falls back to splitting.
const MAX_SEGMENTS: usize = 24;

#[derive(Debug)]
pub struct Segments<'a> {
    segs: [&'a str; MAX_SEGMENTS],
    n: usize,
    path: &'a str,
}

impl<'a> Segments<'a> {
    /// `path` must already be [`normalize`]d.
    pub fn new(path: &'a str) -> Segments<'a> {
        let mut segs = [""; MAX_SEGMENTS];
        let mut n = 0;
        for s in path.split('/').filter(|s| !s.is_empty()) {
            if n == MAX_SEGMENTS {
                break;
            }
            segs[n] = s;
            n += 1;
        }
        Segments { segs, n, path }
    }

    pub fn as_str(&self) -> &'a str {
        self.path
    }
}

#[derive(Debug, Clone)]
enum Seg {
    Literal(Box<str>),
    Glob(Box<str>),
}

impl Seg {
    fn matches(&self, s: &str) -> bool {
        match self {
            Seg::Literal(l) => **l == *s,
            Seg::Glob(g) => glob_match(g, s),
        }
    }
}

/// A path pattern matched segment by segment as a prefix at a `/` boundary; `*` matches within
/// one segment.
#[derive(Debug, Clone)]
pub struct PathPattern {
    segs: Box<[Seg]>,
    text: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path pattern {0:?} must start with '/'")]
pub struct PathPatternError(pub String);

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, PathPatternError> {
        if !text.starts_with('/') || text.contains(['?', '#', ' ']) {
            return Err(PathPatternError(text.to_string()));
        }
        let norm = normalize(text);
        let segs = norm
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| match s.contains('*') {
                true => Seg::Glob(s.into()),
                false => Seg::Literal(s.into()),
            })
            .collect();
        Ok(PathPattern {
            segs,
            text: text.into(),
        })
    }

    /// Segments in the pattern: longer patterns are more specific.
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `path` must already be [`normalize`]d.
    pub fn matches(&self, path: &str) -> bool {
        self.matches_segments(&Segments::new(path))
    }

    pub fn matches_segments(&self, path: &Segments<'_>) -> bool {
        if self.segs.len() > MAX_SEGMENTS {
            let mut segs = path.path.split('/').filter(|s| !s.is_empty());
            return self
                .segs
                .iter()
                .all(|p| segs.next().is_some_and(|s| p.matches(s)));
        }
        self.segs.len() <= path.n
            && self
                .segs
                .iter()
                .zip(&path.segs[..path.n])
                .all(|(p, s)| p.matches(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_form() {
        assert_eq!(normalize("/v1/batches"), "/v1/batches");
        assert!(matches!(
            normalize("/v1/batches?x=1"),
            Cow::Borrowed("/v1/batches")
        ));
        assert_eq!(normalize("/v1//batches"), "/v1/batches");
        assert_eq!(normalize("/v1/./batches"), "/v1/batches");
        assert_eq!(normalize("/v1/x/../batches"), "/v1/batches");
        assert_eq!(normalize("/v1/%62atches"), "/v1/batches");
        assert_eq!(normalize("/v1/%2e%2e/v1/batches"), "/v1/batches");
        assert_eq!(normalize("/v1/a%2fb"), "/v1/a%2Fb");
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("/../.."), "/");
        assert_eq!(normalize("/v1/files/"), "/v1/files/");
        assert_eq!(normalize("/%"), "/%");
        assert_eq!(normalize("/%4"), "/%4");
    }

    #[test]
    fn patterns() {
        let p = PathPattern::parse("/v1/models").unwrap();
        assert!(p.matches("/v1/models"));
        assert!(p.matches("/v1/models/gpt-4o"));
        assert!(!p.matches("/v1/modelsx"));
        assert!(!p.matches("/v1"));
        let g = PathPattern::parse("/v1beta/models/*:generateContent").unwrap();
        assert!(g.matches("/v1beta/models/gemini-2.0-flash:generateContent"));
        assert!(!g.matches("/v1beta/models/gemini:streamGenerateContent"));
        assert!(PathPattern::parse("/").unwrap().matches("/anything"));
        assert!(PathPattern::parse("v1").is_err());
    }
}
