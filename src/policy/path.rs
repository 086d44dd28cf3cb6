//! Request paths: the normal form rules are matched against, and segment-wise path patterns.
//!
//! Origins treat `/v1/./batches`, `/v1//batches` and `/v1/%62atches` as `/v1/batches`; if the
//! policy did not, a client could dodge a path rule by spelling. Matching therefore runs on the
//! RFC 3986 §6.2.2 normal form (unreserved percent-escapes decoded, dot segments removed) with
//! empty segments collapsed, and on what lenient origins also accept: ASCII case folded
//! (ASP.NET and IIS route case-insensitively), `;params` cut from each segment (servlet
//! containers, where `..;` is `..`), and `\` read as `/` (IIS). A path that differs only in
//! these is, at a strict origin, a 404, so deciding it as the path it spells is never looser.
//! The request is still forwarded exactly as the client sent it.
//!
//! Removing dot segments is the one step that can make a path *shorter*: `/v1/files/..` is `/`
//! in normal form, but origins that route on the path as sent (Express, many gateways) still
//! see it under `/v1/files`. A path with a dot segment therefore also has a [`literal`] form,
//! with `.` and `..` kept as ordinary segments, and `Policy::decide` takes the stricter of the
//! two decisions.

use std::borrow::Cow;

use super::hostmatch::glob_match;

/// The path without its query, normalised for matching. Borrows when already normal, which is
/// the common case, so the hot path does not allocate. A path with any `%` or a `.` after a
/// slash is always copied: `Policy::decide` relies on that to skip the `%2F` and dot-segment
/// readings for borrowed paths.
pub fn normalize(path_and_query: &str) -> Cow<'_, str> {
    // One pass finds both the end of the path and whether it is already normal.
    let b = path_and_query.as_bytes();
    let mut end = b.len();
    let mut work = b.first() != Some(&b'/');
    let mut after_slash = false;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'?' | b'#' => {
                end = i;
                break;
            }
            b'/' => {
                work |= after_slash;
                after_slash = true;
                continue;
            }
            b'%' | b';' | b'\\' | b'A'..=b'Z' => work = true,
            b'.' => work |= after_slash,
            _ => {}
        }
        after_slash = false;
    }
    let path = &path_and_query[..end];
    if !work || path.is_empty() {
        return Cow::Borrowed(if path.is_empty() { "/" } else { path });
    }
    Cow::Owned(normal_form(path, true))
}

/// The path without its query in the form origins that do not resolve dot segments route
/// on: as [`normalize`] but with `.` and `..` kept as ordinary segments. `None` when the path
/// has no dot segment (`.` or `..`, also spelled `%2e`, also with `;params`), where this form
/// is the normal form; that answer needs no allocation.
pub fn literal(path_and_query: &str) -> Option<String> {
    let path = path_only(path_and_query);
    has_dot_segment(path).then(|| normal_form(path, false))
}

/// Whether the path (and query) has a `.` or `..` segment once `%2e` is read as `.` and
/// `;params` are cut; `\` separates segments as `/` does.
pub fn has_dot_segment(path_and_query: &str) -> bool {
    path_only(path_and_query)
        .as_bytes()
        .split(|&c| c == b'/' || c == b'\\')
        .any(|seg| is_dot_segment(seg.split(|&c| c == b';').next().unwrap_or_default()))
}

/// `.` or `..`, each dot possibly written `%2e` or `%2E` (what [`decode_unreserved`] turns
/// into a dot).
fn is_dot_segment(mut seg: &[u8]) -> bool {
    let mut dots = 0;
    while let Some(&c) = seg.first() {
        seg = match (c, seg.get(1), seg.get(2)) {
            (b'.', _, _) => &seg[1..],
            (b'%', Some(b'2'), Some(b'e' | b'E')) => &seg[3..],
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

fn path_only(path_and_query: &str) -> &str {
    let end = path_and_query
        .bytes()
        .position(|c| c == b'?' || c == b'#')
        .unwrap_or(path_and_query.len());
    &path_and_query[..end]
}

/// The normal form of a path (no query): unreserved escapes decoded, `;params` cut, `\` read
/// as `/`, empty segments dropped, ASCII lowercase; dot segments resolved when `resolve_dots`,
/// else kept as segments.
fn normal_form(path: &str, resolve_dots: bool) -> String {
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    // A trailing `/` is kept, also when it was followed by `;params` only.
    let mut trailing = false;
    for seg in decoded.split(['/', '\\']) {
        // `split` yields at least one piece: the segment without its parameters.
        let seg = seg.split(';').next().unwrap_or_default();
        trailing = seg.is_empty();
        match seg {
            "" => {}
            "." if resolve_dots => {}
            ".." if resolve_dots => {
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
    if s.is_empty() || (trailing && !out.is_empty()) {
        s.push('/');
    }
    s.make_ascii_lowercase();
    s
}

/// Every other way origins may read `path_and_query` that [`normalize`] does not cover, each
/// as a path for [`Segments::new`]: its dot segments kept as sent ([`literal`]), and each
/// reading of [`with_delimiters_decoded`], with its dot segments resolved and as sent.
pub fn other_readings(path_and_query: &str, mut each: impl FnMut(&str)) {
    if let Some(literal) = literal(path_and_query) {
        each(&literal);
    }
    with_delimiters_decoded(path_and_query, |decoded| {
        each(&normalize(decoded));
        if let Some(literal) = literal(decoded) {
            each(&literal);
        }
    });
}

/// Escapes of delimiters that RFC 3986 makes data but some origins decode before routing
/// (ASGI servers, Go's `net/http` and Express among them), by kind.
const ESC_SLASH: u8 = 1;
const ESC_COLON: u8 = 2;

fn escaped_delimiter(b: &[u8], i: usize) -> u8 {
    if b[i] != b'%' {
        return 0;
    }
    match (b.get(i + 1), b.get(i + 2)) {
        // `%2F`, and `%5C` (a backslash, which IIS reads as `/`).
        (Some(b'2'), Some(b'f' | b'F')) | (Some(b'5'), Some(b'c' | b'C')) => ESC_SLASH,
        // `%3A`: Google's APIs put the method after a colon (`models/x:generateContent`).
        (Some(b'3'), Some(b'a' | b'A')) => ESC_COLON,
        _ => 0,
    }
}

/// The path part (the query dropped) with escaped delimiters decoded, once for each kind it
/// has and once for all of them: `/v1%2Ffiles` as `/v1/files`, `/models/x%3AgenerateContent`
/// as `/models/x:generateContent`. Nothing when it has none.
pub fn with_delimiters_decoded(path_and_query: &str, mut each: impl FnMut(&str)) {
    // Every decision asks: the usual answer has to be one memchr.
    if !path_and_query.as_bytes().contains(&b'%') {
        return;
    }
    let b = path_only(path_and_query).as_bytes();
    let present = (0..b.len()).fold(0, |kinds, i| kinds | escaped_delimiter(b, i));
    for which in [ESC_SLASH, ESC_COLON, ESC_SLASH | ESC_COLON] {
        if which & present != which {
            continue;
        }
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match escaped_delimiter(b, i) & which {
                ESC_SLASH => out.push(b'/'),
                ESC_COLON => out.push(b':'),
                _ => {
                    out.push(b[i]);
                    i += 1;
                    continue;
                }
            }
            i += 3;
        }
        // Only ASCII escapes were replaced, so the rest is still UTF-8.
        if let Ok(decoded) = String::from_utf8(out) {
            each(&decoded);
        }
    }
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
/// longer than that (none is) falls back to splitting. Offsets, not slices: the struct is
/// built per request and small is fast.
const MAX_SEGMENTS: usize = 16;

#[derive(Debug)]
pub struct Segments<'a> {
    /// (start, end) byte offsets into `path`.
    spans: [(u16, u16); MAX_SEGMENTS],
    n: usize,
    path: &'a str,
}

/// How [`Segments::of_normal`] reads each byte of a path.
const ORDINARY: u8 = 0;
const SLASH: u8 = 1;
/// `?` or `#`: the path ends.
const PATH_END: u8 = 2;
/// A `.` is normal except at a segment's start.
const DOT: u8 = 3;
/// `%`, `;`, `\` and upper case: `normalize` would copy the path.
const NOT_NORMAL: u8 = 4;
static BYTE_CLASS: [u8; 256] = {
    let mut t = [ORDINARY; 256];
    t[b'/' as usize] = SLASH;
    t[b'?' as usize] = PATH_END;
    t[b'#' as usize] = PATH_END;
    t[b'.' as usize] = DOT;
    t[b'%' as usize] = NOT_NORMAL;
    t[b';' as usize] = NOT_NORMAL;
    t[b'\\' as usize] = NOT_NORMAL;
    let mut c = b'A';
    while c <= b'Z' {
        t[c as usize] = NOT_NORMAL;
        c += 1;
    }
    t
};

impl<'a> Segments<'a> {
    /// `path` must already be [`normalize`]d.
    pub fn new(path: &'a str) -> Segments<'a> {
        let mut spans = [(0u16, 0u16); MAX_SEGMENTS];
        let mut n = 0;
        // A path too long for u16 offsets is matched by splitting (see `matches_segments`).
        if path.len() <= u16::MAX as usize {
            let bytes = path.as_bytes();
            let mut start = 0;
            for i in 0..=bytes.len() {
                if i == bytes.len() || bytes[i] == b'/' {
                    if i > start {
                        if n == MAX_SEGMENTS {
                            break;
                        }
                        spans[n] = (start as u16, i as u16);
                        n += 1;
                    }
                    start = i + 1;
                }
            }
        }
        Segments { spans, n, path }
    }

    /// [`normalize`] and [`Segments::new`] in one pass, for the usual request path that is
    /// already in normal form: `None` where `normalize` would copy (or the path is not
    /// origin-form, or is too long for the offsets), and the caller takes the general route.
    /// A decision runs on every request and this halves its walks over the path.
    pub fn of_normal(path_and_query: &'a str) -> Option<Segments<'a>> {
        let b = path_and_query.as_bytes();
        if b.first() != Some(&b'/') || b.len() > u16::MAX as usize {
            return None;
        }
        let mut spans = [(0u16, 0u16); MAX_SEGMENTS];
        let mut n = 0;
        let mut start = 1;
        let mut end = b.len();
        // Most bytes of a path are ordinary, and the inner loop passes them with one table
        // load and one compare each. A byte at `start` is the first of its segment.
        let mut i = 1;
        loop {
            while i < b.len() && BYTE_CLASS[b[i] as usize] == ORDINARY {
                i += 1;
            }
            let Some(&c) = b.get(i) else {
                break;
            };
            match BYTE_CLASS[c as usize] {
                // An empty segment, or one starting with a dot: `normalize` would copy.
                SLASH | DOT if i == start => return None,
                SLASH => {
                    // As `new`: segments past the sixteenth are not held.
                    if n < MAX_SEGMENTS {
                        spans[n] = (start as u16, i as u16);
                        n += 1;
                    }
                    start = i + 1;
                }
                PATH_END => {
                    end = i;
                    break;
                }
                DOT => {}
                _ => return None,
            }
            i += 1;
        }
        if end > start && n < MAX_SEGMENTS {
            spans[n] = (start as u16, end as u16);
            n += 1;
        }
        Some(Segments {
            spans,
            n,
            path: &path_and_query[..end],
        })
    }

    pub fn as_str(&self) -> &'a str {
        self.path
    }

    fn get(&self, i: usize) -> &'a str {
        let (a, b) = self.spans[i];
        &self.path[a as usize..b as usize]
    }

    /// The offsets hold this path (it is under 64 KiB); otherwise matching splits it again.
    fn complete(&self) -> bool {
        self.path.len() <= u16::MAX as usize
    }

    pub fn is_splittable(&self) -> bool {
        self.complete()
    }

    /// The `i`th segment, if the path has that many (and the offsets hold them).
    pub fn segment(&self, i: usize) -> Option<&'a str> {
        (i < self.n).then(|| self.get(i))
    }
}

/// Maps path patterns to values; finds the longest pattern a path matches by walking its
/// segments once, instead of trying every pattern.
#[derive(Debug, Clone)]
pub struct PathTrie<T> {
    root: TrieNode<T>,
    /// Patterns longer than the stack split holds: tried one by one.
    long: Vec<(PathPattern, T, usize)>,
    inserted: usize,
}

#[derive(Debug, Clone)]
struct TrieNode<T> {
    /// The value and its insertion order (later wins a tie, like `max_by_key`).
    value: Option<(T, usize)>,
    /// Few children per node (a vendor's API paths): a scan beats hashing.
    lits: Vec<(Box<str>, TrieNode<T>)>,
    globs: Vec<(Box<str>, TrieNode<T>)>,
}

impl<T> Default for TrieNode<T> {
    fn default() -> Self {
        TrieNode {
            value: None,
            lits: Vec::new(),
            globs: Vec::new(),
        }
    }
}

impl<T> Default for PathTrie<T> {
    fn default() -> Self {
        PathTrie {
            root: TrieNode::default(),
            long: Vec::new(),
            inserted: 0,
        }
    }
}

impl<T: Copy> PathTrie<T> {
    pub fn insert(&mut self, p: &PathPattern, v: T) {
        let order = self.inserted;
        self.inserted += 1;
        if p.segs.len() > MAX_SEGMENTS {
            self.long.push((p.clone(), v, order));
            return;
        }
        let mut node = &mut self.root;
        for seg in p.segs.iter() {
            let (list, text) = match seg {
                Seg::Literal(l) => (&mut node.lits, l),
                Seg::Glob(g) => (&mut node.globs, g),
            };
            let i = match list.iter().position(|(k, _)| k == text) {
                Some(i) => i,
                None => {
                    list.push((text.clone(), TrieNode::default()));
                    list.len() - 1
                }
            };
            node = &mut list[i].1;
        }
        node.value = Some((v, order));
    }

    /// The value of the longest pattern `path` matches (segment count; a tie goes to the one
    /// inserted last).
    pub fn longest(&self, path: &Segments<'_>) -> Option<T> {
        let mut best: Option<(usize, usize, T)> = None;
        if path.complete() {
            Self::walk(&self.root, path, 0, &mut best);
        } else {
            // Offsets could not hold this path: fall back to per-pattern matching.
            return None;
        }
        for (p, v, order) in &self.long {
            if p.matches_segments(path) {
                let cand = (p.segs.len(), *order, *v);
                if best.is_none_or(|b| (cand.0, cand.1) > (b.0, b.1)) {
                    best = Some(cand);
                }
            }
        }
        best.map(|(_, _, v)| v)
    }

    fn walk(
        mut node: &TrieNode<T>,
        path: &Segments<'_>,
        mut depth: usize,
        best: &mut Option<(usize, usize, T)>,
    ) {
        // Globs branch (recursion); the one literal child that can match is followed in the
        // loop, so a plain API path costs no calls.
        loop {
            if let Some((v, order)) = node.value {
                if best.is_none_or(|b| (depth, order) > (b.0, b.1)) {
                    *best = Some((depth, order, v));
                }
            }
            if depth >= path.n {
                return;
            }
            let seg = path.get(depth);
            for (g, child) in &node.globs {
                if glob_match(g, seg) {
                    Self::walk(child, path, depth + 1, best);
                }
            }
            match node.lits.iter().find(|(k, _)| **k == *seg) {
                Some((_, child)) => {
                    node = child;
                    depth += 1;
                }
                None => return,
            }
        }
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
#[error("path pattern {0:?} must start with '/' and hold no '?', '#', ';', '\\' or space")]
pub struct PathPatternError(pub String);

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, PathPatternError> {
        // `;` and `\` would be cut or turned into `/` by `normalize`: refused, not rewritten.
        if !text.starts_with('/') || text.contains(['?', '#', ' ', ';', '\\']) {
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
        if self.segs.len() > MAX_SEGMENTS || !path.complete() {
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
                .enumerate()
                .all(|(i, p)| p.matches(path.get(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass split of an already-normal path is exactly `normalize` then `new`, and
    /// declines every path `normalize` would copy (those get their other readings).
    fn assert_split_as_normalize(raw: &str) {
        let normal = normalize(raw);
        let slow = Segments::new(&normal);
        match Segments::of_normal(raw) {
            Some(fast) => {
                assert!(matches!(normal, Cow::Borrowed(_)), "{raw:?} needs copying");
                assert_eq!(fast.as_str(), slow.as_str(), "{raw:?}");
                assert_eq!(fast.n, slow.n, "{raw:?}");
                for i in 0..fast.n {
                    assert_eq!(fast.get(i), slow.get(i), "{raw:?} segment {i}");
                }
            }
            None => assert!(
                matches!(normal, Cow::Owned(_)) || !raw.starts_with('/'),
                "{raw:?} is normal but was not split"
            ),
        }
    }

    #[test]
    fn one_pass_split_agrees_with_normalize() {
        for raw in [
            "/",
            "/?",
            "/#x",
            "/v1/chat/completions",
            "/v1/chat/completions?stream=1",
            "/v1/",
            "/v1//x",
            "//",
            "/./x",
            "/x/.",
            "/x/..",
            "/x/.hidden",
            "/x.y/z.",
            "/a.b",
            "/V1",
            "/v1/%2e",
            "/v1;x",
            "/v1\\x",
            "/v1/x?/..//%",
            "/v1/x#/./",
            "",
            "?x",
            "x/y",
            "*",
            "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s",
            "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/",
            "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p",
            "/é/ü",
            "/~user/-_.!$&'()*+,=:@",
        ] {
            assert_split_as_normalize(raw);
        }
        // Every string over the bytes that steer the scan, up to five long.
        let alphabet = ["/", ".", "a", "A", "%", ";", "?", "#", "\\"];
        let mut frontier = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for s in &frontier {
                for c in alphabet {
                    let t = format!("{s}{c}");
                    assert_split_as_normalize(&t);
                    next.push(t);
                }
            }
            frontier = next;
        }
    }

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
        assert_eq!(normalize("/v1/a%2fb"), "/v1/a%2fb");
        assert_eq!(normalize("/v1/a%2Fb"), "/v1/a%2fb");
        // What lenient origins accept: case, `;params` (and `..;`), backslashes.
        for spelled in [
            "/V1/Batches",
            "/v1/BATCHES?Q=A",
            "/v1/batches;x",
            "/v1;jsessionid=1/batches",
            "/v1/files/..;/batches",
            "/v1\\batches",
            "\\v1\\x\\..\\batches",
        ] {
            assert_eq!(normalize(spelled), "/v1/batches", "{spelled}");
        }
        assert_eq!(normalize("/v1/batches;x/"), "/v1/batches/");
        let decoded = |p: &str| {
            let mut all = Vec::new();
            with_delimiters_decoded(p, |d| all.push(d.to_owned()));
            all
        };
        assert_eq!(decoded("/v1%5cfiles%5C"), ["/v1/files/"]);
        assert_eq!(decoded("/v1%2Ffiles%2f?q=%2F"), ["/v1/files/"]);
        assert!(decoded("/v1/files?q=%2F").is_empty());
        assert!(decoded("/v1/%2").is_empty());
        assert!(decoded("/v1/%3").is_empty());
        assert!(decoded("/v1/%41").is_empty());
        assert_eq!(
            normalize(&decoded("/v1/x%2F..%2Fbatches")[0]),
            "/v1/batches"
        );
        assert_eq!(
            decoded("/v1beta/models/x%3agenerateContent"),
            ["/v1beta/models/x:generateContent"]
        );
        // Each kind alone, and both: an origin may decode one and not the other.
        assert_eq!(decoded("/a%2Fb%3Ac"), ["/a/b%3Ac", "/a%2Fb:c", "/a/b:c"]);
        let mut all = Vec::new();
        other_readings("/v1/models/x%3A..%2Fbatches", |p| all.push(p.to_owned()));
        assert_eq!(
            all,
            [
                "/v1/models/x%3a../batches",
                "/v1/models/x:..%2fbatches",
                "/v1/models/x:../batches",
            ]
        );
        all.clear();
        other_readings("/v1/m/..%2Fx%3Ay", |p| all.push(p.to_owned()));
        assert_eq!(
            all,
            [
                "/v1/x%3ay",
                "/v1/m/../x%3ay",
                "/v1/m/..%2fx:y",
                "/v1/x:y",
                "/v1/m/../x:y"
            ]
        );
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("/../.."), "/");
        assert_eq!(normalize("/v1/files/"), "/v1/files/");
        assert_eq!(normalize("/%"), "/%");
        assert_eq!(normalize("/%4"), "/%4");
        // `decide` tries the `%2F` reading only for copied paths.
        for p in ["/a%2Fb", "/%2f", "/v1/%", "/a%2Fb?x", "/x/%2F/"] {
            assert!(matches!(normalize(p), Cow::Owned(_)), "{p}");
        }
    }

    #[test]
    fn literal_form_keeps_dot_segments() {
        for (spelled, literal_form) in [
            ("/v1/files/..", "/v1/files/.."),
            ("/v1/files/%2e%2e", "/v1/files/.."),
            ("/v1/files/%2E.", "/v1/files/.."),
            (
                "/v1/files/..;/file-abc/content",
                "/v1/files/../file-abc/content",
            ),
            ("/v1/batches/..;x/cancel", "/v1/batches/../cancel"),
            ("/V1/./Batches/?q=/../x", "/v1/./batches/"),
            ("/v1\\..\\files", "/v1/../files"),
            ("/v1/files/.;x", "/v1/files/."),
            ("..", "/.."),
        ] {
            assert_eq!(literal(spelled).as_deref(), Some(literal_form), "{spelled}");
            assert!(has_dot_segment(spelled), "{spelled}");
        }
        // No dot segment: the literal form is the normal form, and nothing is copied.
        for plain in [
            "/v1/files",
            "/v1/.well-known/x",
            "/v1/...",
            "/v1/%2e%2e%2e",
            "/v1/a..",
            "/v1/%2e%2",
            "/v1/files?x=/..",
            "/v1/files#/..",
            "/v1/%252e%252e",
            "/",
            "",
        ] {
            assert_eq!(literal(plain), None, "{plain}");
        }
        // A dot segment always makes `normalize` copy: `decide` tries the literal form only then.
        for p in [
            "/v1/files/..",
            "/v1/files/%2e%2e",
            "/a/.",
            "\\..",
            "..",
            "/a;/..",
        ] {
            assert!(matches!(normalize(p), Cow::Owned(_)), "{p}");
        }
    }

    #[test]
    fn patterns() {
        let p = PathPattern::parse("/v1/models").unwrap();
        assert!(p.matches("/v1/models"));
        assert!(p.matches("/v1/models/gpt-4o"));
        assert!(!p.matches("/v1/modelsx"));
        assert!(!p.matches("/v1"));
        let g = PathPattern::parse("/v1beta/models/*:generateContent").unwrap();
        // Patterns and paths meet in the normal form, where case is folded.
        assert!(g.matches(&normalize(
            "/v1beta/models/gemini-2.0-flash:generateContent"
        )));
        assert!(g.matches(&normalize(
            "/V1BETA/models/gemini-2.0-flash:GENERATECONTENT"
        )));
        assert!(!g.matches(&normalize("/v1beta/models/gemini:streamGenerateContent")));
        assert!(PathPattern::parse("/").unwrap().matches("/anything"));
        for bad in ["v1", "/v1;x", "/v1\\files", "/v1?x"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trie_agrees_with_trying_every_pattern() {
        let pats = [
            "/",
            "/v1",
            "/v1/chat/completions",
            "/v1/files",
            "/v1/files/*/content",
            "/v1beta/models/*:generateContent",
            "/v1beta/models/*:streamGenerateContent",
            "/v1beta/models",
            "/v1/*/completions",
        ];
        let mut trie = PathTrie::default();
        let parsed: Vec<PathPattern> = pats
            .iter()
            .map(|p| PathPattern::parse(p).unwrap())
            .collect();
        for (i, p) in parsed.iter().enumerate() {
            trie.insert(p, i);
        }
        for path in [
            "/",
            "/v1",
            "/v1/chat/completions",
            "/v1/chat/completions/x",
            "/v1/x/completions",
            "/v1/files/abc/content",
            "/v1/files/abc",
            "/v1beta/models/gemini:generateContent",
            "/v1beta/models/gemini:streamGenerateContent",
            "/v1beta/models",
            "/v2/other",
            "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s",
        ] {
            let segs = Segments::new(path);
            let linear = parsed
                .iter()
                .enumerate()
                .filter(|(_, p)| p.matches_segments(&segs))
                .max_by_key(|(_, p)| p.len())
                .map(|(i, _)| i);
            assert_eq!(trie.longest(&segs), linear, "{path}");
        }
    }
}
