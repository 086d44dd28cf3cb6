//! Host patterns and the index that matches a host name against many of them.
//!
//! A lookup is a handful of hash probes (the name, then each parent suffix), never a scan over
//! every pattern: catalogs and rule sets grow to thousands of hosts and this runs per request.
//!
//! Pattern forms, as operators write them:
//! - `api.example.com`: that name only;
//! - `.example.com`: the name and every subdomain (squid's `dstdomain` spelling);
//! - `*.example.com`: every subdomain, not the name itself;
//! - a `*` inside a label (`*-aiplatform.googleapis.com`, `bedrock.*.amazonaws.com`) matches
//!   within that one label; such globs are grouped under their last two literal labels.

use rustc_hash::FxHashMap;

/// A host pattern that failed validation; the caller adds file:line:col.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty host pattern, or an empty label in one (`a..example.com`)")]
    Empty,
    #[error("host pattern {0:?} has an invalid character (use lowercase a-z, 0-9, '-', '.', '*')")]
    BadChar(String),
    #[error("host pattern {0:?} needs at least two literal labels after its last '*'")]
    GlobTooBroad(String),
    /// `api.example.com:443`: a pattern names a host only, the port is its own condition.
    #[error("host pattern {pattern:?} has a port: write the host alone ({host:?}) and match the port with `port = [{port}]` in a rule")]
    Port {
        pattern: String,
        host: String,
        port: u16,
    },
    /// Any other ':', '[' or ']': never part of a host name, so such a pattern would match
    /// nothing.
    #[error("host pattern {0:?} has ':', '[' or ']': a host pattern is a name; match a port with `port = [...]` in a rule, and write an IPv6 address as a rule's host (\"2001:db8::1\" or \"[2001:db8::1]\")")]
    NotAName(String),
    /// `300.1.1.1`, `example.123`: a host whose last label is a number is an IPv4 address to
    /// every URL parser (and to the proxy), so a pattern that is not a valid one names no host.
    #[error("host pattern {0:?} ends in a number but is not a valid IPv4 address: no request can name such a host")]
    NotAnAddress(String),
}

/// How specific a match was: exact beats glob beats the longest suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Specificity {
    Suffix(usize),
    Glob,
    Exact,
}

#[derive(Debug, Clone)]
enum Kind {
    Exact(Box<str>),
    /// apex included?
    Suffix(Box<str>, bool),
    Glob {
        key: Box<str>,
        labels: Vec<Box<str>>,
    },
}

/// One validated pattern, ready to insert into a [`HostIndex`].
#[derive(Debug, Clone)]
pub struct HostPattern {
    kind: Kind,
    text: Box<str>,
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<HostPattern, PatternError> {
        let lower = text.trim().to_ascii_lowercase();
        let t = lower.strip_suffix('.').unwrap_or(&lower);
        if t.is_empty() || t == "." || t == "*." {
            return Err(PatternError::Empty);
        }
        if t.contains([':', '[', ']']) {
            return Err(port_or_address(text));
        }
        if !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'_'))
        {
            return Err(PatternError::BadChar(text.to_string()));
        }
        if super::target::ends_in_number(t) {
            return Err(PatternError::NotAnAddress(text.to_string()));
        }
        let kind = if let Some(rest) = t.strip_prefix("*.").filter(|r| !r.contains('*')) {
            Kind::Suffix(rest.into(), false)
        } else if let Some(rest) = t.strip_prefix('.').filter(|r| !r.contains('*')) {
            Kind::Suffix(rest.into(), true)
        } else if t.contains('*') {
            let labels: Vec<Box<str>> = t.split('.').map(Into::into).collect();
            if labels.iter().any(|l| l.is_empty()) {
                // `x.*.deepseek..com`: no host has an empty label, so it would match nothing.
                return Err(PatternError::Empty);
            }
            let n = labels.len();
            if n < 3 || labels[n - 1].contains('*') || labels[n - 2].contains('*') {
                return Err(PatternError::GlobTooBroad(text.to_string()));
            }
            Kind::Glob {
                key: format!("{}.{}", labels[n - 2], labels[n - 1]).into(),
                labels,
            }
        } else {
            Kind::Exact(t.into())
        };
        if let Kind::Suffix(rest, _) | Kind::Exact(rest) = &kind {
            if rest.is_empty() || rest.split('.').any(str::is_empty) {
                return Err(PatternError::Empty);
            }
        }
        Ok(HostPattern {
            kind,
            text: t.into(),
        })
    }

    /// Whether `host` (lowercase, no trailing dot) matches; the index does the same with hash
    /// probes, this is the one-pattern form.
    pub fn matches(&self, host: &str) -> bool {
        match &self.kind {
            Kind::Exact(k) => host == &**k,
            Kind::Suffix(k, apex) => {
                (*apex && host == &**k)
                    || (host.len() > k.len()
                        && host.ends_with(&**k)
                        && host.as_bytes()[host.len() - k.len() - 1] == b'.')
            }
            Kind::Glob { labels, .. } => glob_labels_match(labels, host),
        }
    }

    /// The pattern as normalised (lowercase, no trailing dot).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Why a pattern with ':', '[' or ']' is refused: `host:port` (also `[v6]:port`) gets the
/// spelling to use instead. Address literals never get here from a rule or `[intercept]`,
/// which match them by value before parsing a pattern.
fn port_or_address(text: &str) -> PatternError {
    let t = text.trim();
    if let Some((host, port)) = t.rsplit_once(':') {
        let named = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(inner) => !inner.is_empty() && !inner.contains(['[', ']']),
            None => !host.is_empty() && !host.contains([':', '[', ']']),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|_| port.bytes().all(|b| b.is_ascii_digit()));
        if let (true, Some(port)) = (named, port) {
            return PatternError::Port {
                pattern: text.to_string(),
                host: host.to_string(),
                port,
            };
        }
    }
    PatternError::NotAName(text.to_string())
}

/// Label globs sharing a two-label key, each with its value.
type GlobList<T> = Vec<(Vec<Box<str>>, T)>;

/// What the patterns naming one domain hold: `example.com`, `.example.com`, `*.example.com`.
/// Kept together so a lookup probes the table once per suffix, not once per form.
#[derive(Debug, Clone)]
struct Slots<T> {
    exact: Option<T>,
    /// The name and its subdomains.
    incl: Option<T>,
    /// Subdomains only.
    subs: Option<T>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            exact: None,
            incl: None,
            subs: None,
        }
    }
}

/// Maps host patterns to values of `T`.
#[derive(Debug, Clone)]
pub struct HostIndex<T> {
    names: FxHashMap<Box<str>, Slots<T>>,
    globs: FxHashMap<Box<str>, GlobList<T>>,
    /// The shortest and longest names of `.x` and `*.x` patterns: a parent suffix outside
    /// them has nothing to find, so the walk up a host's suffixes skips its probe.
    suffix_lens: (usize, usize),
}

impl<T> Default for HostIndex<T> {
    fn default() -> Self {
        HostIndex {
            names: FxHashMap::default(),
            globs: FxHashMap::default(),
            suffix_lens: (usize::MAX, 0),
        }
    }
}

impl<T> HostIndex<T> {
    /// The slot for a pattern, created with `make` on first use; lets callers detect duplicates
    /// (catalog) or accumulate (rule lists).
    pub fn entry(&mut self, p: &HostPattern, make: impl FnOnce() -> T) -> (&mut T, bool) {
        fn slot<T>(s: &mut Option<T>, make: impl FnOnce() -> T) -> (&mut T, bool) {
            let fresh = s.is_none();
            (s.get_or_insert_with(make), fresh)
        }
        if let Kind::Suffix(k, _) = &p.kind {
            let (min, max) = &mut self.suffix_lens;
            (*min, *max) = ((*min).min(k.len()), (*max).max(k.len()));
        }
        match &p.kind {
            Kind::Exact(k) => slot(&mut self.names.entry(k.clone()).or_default().exact, make),
            Kind::Suffix(k, true) => slot(&mut self.names.entry(k.clone()).or_default().incl, make),
            Kind::Suffix(k, false) => {
                slot(&mut self.names.entry(k.clone()).or_default().subs, make)
            }
            Kind::Glob { key, labels } => {
                let list = self.globs.entry(key.clone()).or_default();
                match list.iter().position(|(l, _)| l == labels) {
                    Some(i) => (&mut list[i].1, false),
                    None => {
                        list.push((labels.clone(), make()));
                        (&mut list.last_mut().expect("just pushed").1, true)
                    }
                }
            }
        }
    }

    /// The patterns held, spelled as in a config (for display; order unspecified).
    pub fn patterns(&self) -> impl Iterator<Item = String> + '_ {
        self.names
            .iter()
            .flat_map(|(k, s)| {
                [
                    s.exact.as_ref().map(|_| k.to_string()),
                    s.incl.as_ref().map(|_| format!(".{k}")),
                    s.subs.as_ref().map(|_| format!("*.{k}")),
                ]
            })
            .flatten()
            .chain(
                self.globs
                    .values()
                    .flatten()
                    .map(|(labels, _)| labels.join(".")),
            )
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.globs.is_empty()
    }

    /// Calls `f` for every pattern that matches `host` (lowercase, no trailing dot), most
    /// specific first; stops when `f` returns false.
    pub fn for_each_match<'a>(&'a self, host: &str, mut f: impl FnMut(&'a T, Specificity) -> bool) {
        let own = self.names.get(host);
        if let Some(v) = own.and_then(|s| s.exact.as_ref()) {
            if !f(v, Specificity::Exact) {
                return;
            }
        }
        let (shortest, longest) = self.suffix_lens;
        // The longest suffix follows the first dot. Shorter than every `.x` pattern (a vendor's
        // name against rules on longer internal names, often), nothing is walked; the first
        // label is short, so this scan is too.
        let walk = host
            .bytes()
            .position(|c| c == b'.')
            .is_some_and(|d| host.len() - d > shortest);
        let dots = match walk || !self.globs.is_empty() {
            true => Dots::of(host),
            false => Dots::Mask(0),
        };
        if !self.globs.is_empty() {
            if let Some(key) = dots.last_two_labels(host) {
                if let Some(list) = self.globs.get(key) {
                    for (labels, v) in list {
                        if glob_labels_match(labels, host) && !f(v, Specificity::Glob) {
                            return;
                        }
                    }
                }
            }
        }
        if let Some(v) = own.and_then(|s| s.incl.as_ref()) {
            if !f(v, Specificity::Suffix(host.len())) {
                return;
            }
        }
        for dot in dots {
            let rest = &host[dot + 1..];
            if rest.len() < shortest {
                break;
            }
            if rest.len() > longest {
                continue;
            }
            let Some(s) = self.names.get(rest) else {
                continue;
            };
            let spec = Specificity::Suffix(rest.len());
            for v in [&s.subs, &s.incl].into_iter().flatten() {
                if !f(v, spec) {
                    return;
                }
            }
        }
    }

    /// The most specific match.
    pub fn best(&self, host: &str) -> Option<&T> {
        let mut out = None;
        self.for_each_match(host, |v, _| {
            out = Some(v);
            false
        });
        out
    }
}

/// Where a host name's dots are, left to right. A name of up to 64 bytes is read 8 bytes at a
/// time into a bit per byte, once per lookup: the walk up its suffixes and its last two labels
/// then cost a few bit operations, not a byte scan each (most of a lookup that finds nothing).
#[derive(Clone, Copy)]
enum Dots<'h> {
    /// Bit `i`: byte `i` is a dot. Dots already walked past are cleared.
    Mask(u64),
    /// A longer name: scanned byte by byte from `from`.
    Scan { host: &'h [u8], from: usize },
}

impl<'h> Dots<'h> {
    #[inline]
    fn of(host: &'h str) -> Dots<'h> {
        let b = host.as_bytes();
        let len = b.len();
        if len > 64 {
            return Dots::Scan { host: b, from: 0 };
        }
        let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or_default());
        let mut words = b.chunks_exact(8);
        let mut mask = 0u64;
        for (n, w) in (&mut words).enumerate() {
            mask |= dots_in(word(w)) << (8 * n);
        }
        if !words.remainder().is_empty() {
            mask |= match len.checked_sub(8) {
                // The last 8 bytes, overlapping the word before: its dots are set twice.
                Some(at) => dots_in(word(&b[at..])) << at,
                // Zero bytes past the end are not dots.
                None => dots_in(
                    b.iter()
                        .enumerate()
                        .fold(0, |w, (i, &c)| w | u64::from(c) << (8 * i)),
                ),
            };
        }
        Dots::Mask(mask)
    }

    /// The last two labels (`example.com` of `api.example.com`), or the name when it has one
    /// dot; `None` when it has none.
    fn last_two_labels(self, host: &str) -> Option<&str> {
        match self {
            Dots::Mask(0) => None,
            Dots::Mask(m) => {
                let before = m & !(1u64 << (63 - m.leading_zeros()));
                Some(match before {
                    0 => host,
                    _ => &host[64 - before.leading_zeros() as usize..],
                })
            }
            Dots::Scan { .. } => {
                let last = host.bytes().rposition(|c| c == b'.')?;
                Some(match host[..last].bytes().rposition(|c| c == b'.') {
                    Some(i) => &host[i + 1..],
                    None => host,
                })
            }
        }
    }
}

/// The dots among 8 bytes (little-endian): bit `i` set when byte `i` is `.`.
#[inline]
fn dots_in(word: u64) -> u64 {
    const DOTS: u64 = 0x2e2e_2e2e_2e2e_2e2e;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = word ^ DOTS;
    // 0x80 in exactly the bytes of `x` that are zero (the dots).
    let zero = !((x & LOW7).wrapping_add(LOW7) | x | LOW7);
    // Gathers each byte's flag into one bit of the top byte, in order.
    (zero >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

impl Iterator for Dots<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Dots::Mask(0) => None,
            Dots::Mask(m) => {
                let at = m.trailing_zeros() as usize;
                *m &= *m - 1;
                Some(at)
            }
            Dots::Scan { host, from } => {
                let at = *from + host[*from..].iter().position(|&c| c == b'.')?;
                *from = at + 1;
                Some(at)
            }
        }
    }
}

fn glob_labels_match(pattern: &[Box<str>], host: &str) -> bool {
    let mut labels = host.split('.');
    let mut n = 0;
    for p in pattern {
        match labels.next() {
            Some(l) if glob_match(p, l) => n += 1,
            _ => return false,
        }
    }
    labels.next().is_none() && n == pattern.len()
}

/// `*` matches any run of characters (within one label or one path segment: callers split first).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let Some((head, tail)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(rest) = text.strip_prefix(head) else {
        return false;
    };
    let (mids, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    if rest.len() < last.len() || !rest.ends_with(last) {
        return false;
    }
    let mut rest = &rest[..rest.len() - last.len()];
    for mid in mids.split('*').filter(|m| !m.is_empty()) {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(pats: &[(&str, u32)]) -> HostIndex<u32> {
        let mut ix = HostIndex::default();
        for (p, v) in pats {
            *ix.entry(&HostPattern::parse(p).unwrap(), || 0).0 = *v;
        }
        ix
    }

    #[test]
    fn forms_match_as_documented() {
        let ix = index(&[
            ("api.deepseek.com", 1),
            (".deepseek.com", 2),
            ("*.openai.azure.com", 3),
            ("*-aiplatform.googleapis.com", 4),
            ("bedrock-runtime.*.amazonaws.com", 5),
        ]);
        assert_eq!(ix.best("api.deepseek.com"), Some(&1));
        assert_eq!(ix.best("deepseek.com"), Some(&2));
        assert_eq!(ix.best("chat.deepseek.com"), Some(&2));
        assert_eq!(ix.best("a.b.deepseek.com"), Some(&2));
        assert_eq!(ix.best("notdeepseek.com"), None);
        assert_eq!(ix.best("openai.azure.com"), None);
        assert_eq!(ix.best("x.openai.azure.com"), Some(&3));
        assert_eq!(ix.best("us-central1-aiplatform.googleapis.com"), Some(&4));
        assert_eq!(ix.best("aiplatform.googleapis.com"), None);
        assert_eq!(ix.best("x.us-aiplatform.googleapis.com"), None);
        assert_eq!(ix.best("bedrock-runtime.us-east-1.amazonaws.com"), Some(&5));
        assert_eq!(ix.best("s3.us-east-1.amazonaws.com"), None);
        assert_eq!(ix.best("com"), None);
    }

    #[test]
    fn all_matches_visited_most_specific_first() {
        let ix = index(&[("a.b.c", 1), (".b.c", 2), (".c", 3), ("*.a.b.c", 4)]);
        let mut seen = vec![];
        ix.for_each_match("a.b.c", |v, _| {
            seen.push(*v);
            true
        });
        assert_eq!(seen, vec![1, 2, 3]);
    }

    /// Every pattern matching each host, as the index visits them, is every pattern whose
    /// one-pattern form matches it.
    fn index_agrees_with_each_pattern(
        pats: &[&str],
        hosts: impl IntoIterator<Item = impl AsRef<str>>,
    ) {
        let ix = index(
            &pats
                .iter()
                .zip(0..)
                .map(|(p, i)| (*p, i))
                .collect::<Vec<_>>(),
        );
        for h in hosts {
            let h = h.as_ref();
            let mut got = vec![];
            ix.for_each_match(h, |v, _| {
                got.push(*v);
                true
            });
            got.sort_unstable();
            let want: Vec<u32> = (0..pats.len() as u32)
                .filter(|&i| HostPattern::parse(pats[i as usize]).unwrap().matches(h))
                .collect();
            assert_eq!(got, want, "{h}");
        }
    }

    /// The walk skips suffixes shorter or longer than every `.x`/`*.x` name: patterns of
    /// several lengths still match every host the one-pattern form does.
    #[test]
    fn suffixes_of_every_length_are_still_found() {
        let pats = [".io", ".bb.io", "*.a-long-name.example", "exact.bb.io"];
        let hosts = [
            "io",
            "x.io",
            "bb.io",
            "x.bb.io",
            "exact.bb.io",
            "y.x.bb.io",
            "a-long-name.example",
            "q.a-long-name.example",
            "r.q.a-long-name.example",
            "example",
            "q.example",
        ];
        index_agrees_with_each_pattern(&pats, hosts);
    }

    /// The index finds what the one-pattern form matches, for hosts of 1 to 12 labels and
    /// patterns of every form, long ones included.
    #[test]
    fn the_index_agrees_with_each_pattern_alone() {
        let pats = [
            "b.c",
            ".c",
            "*.b.c",
            ".a.b.c",
            "*.c.d.e.f.g.h.i.j.k.l",
            ".d.e.f.g.h.i.j.k.l",
            "a.b.c.d.e.f.g.h.i.j.k.l",
            ".b.c.d.e.f.g.h.i.j.k.l",
            "x*.k.l",
            "*y.j.k.l",
            ".longer-than-eight.l",
        ];
        let mut hosts = vec![];
        let alpha = "abcdefghijkl"
            .split("")
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>();
        for n in 1..=12 {
            hosts.push(alpha[12 - n..].join("."));
            hosts.push(format!("xq.{}", alpha[12 - n..].join(".")));
            hosts.push(format!("zy.{}", alpha[12 - n..].join(".")));
        }
        hosts.extend(
            [
                "b.c",
                "x.b.c",
                "q.longer-than-eight.l",
                "longer-than-eight.l",
            ]
            .map(String::from),
        );
        index_agrees_with_each_pattern(&pats, &hosts);
    }

    #[test]
    fn single_pattern_matches_like_the_index() {
        let hosts = [
            "deepseek.com",
            "api.deepseek.com",
            "x.deepseek.com",
            "notdeepseek.com",
            "com",
        ];
        for pat in [
            ".deepseek.com",
            "*.deepseek.com",
            "api.deepseek.com",
            "*.deepseek.*m",
        ] {
            let Ok(p) = HostPattern::parse(pat) else {
                continue;
            };
            let mut ix = HostIndex::default();
            ix.entry(&p, || ());
            for h in hosts {
                assert_eq!(p.matches(h), ix.best(h).is_some(), "{pat} vs {h}");
            }
        }
    }

    #[test]
    fn dots_are_found_in_names_of_any_length() {
        let mut names: Vec<String> = ["", "a", ".", "..", "a.b", "a®.b.ï.c", "x.y.z.w.v.u.t.s.r.q"]
            .map(String::from)
            .to_vec();
        for len in 1..=140 {
            for every in [2, 3, 7, 9, 64] {
                names.push(
                    (0..len)
                        .map(|i| if i % every == 1 { '.' } else { 'x' })
                        .collect(),
                );
            }
        }
        for n in &names {
            let want: Vec<usize> = n.match_indices('.').map(|(i, _)| i).collect();
            assert_eq!(Dots::of(n).collect::<Vec<_>>(), want, "{n}");
            let last_two = match want.as_slice() {
                [] => None,
                [_] => Some(n.as_str()),
                [.., before, _] => Some(&n[before + 1..]),
            };
            assert_eq!(Dots::of(n).last_two_labels(n), last_two, "{n}");
        }
    }

    #[test]
    fn bad_patterns_refused() {
        assert!(HostPattern::parse("").is_err());
        assert!(HostPattern::parse("*.com").is_ok());
        assert!(HostPattern::parse("foo.*").is_err());
        assert!(HostPattern::parse("a b.com").is_err());
        assert!(HostPattern::parse("a..com").is_err());
        // Label globs with an empty label anywhere would match no host either.
        for p in [
            "x.*.deepseek..com",
            "api-*.deepseek..com",
            "*.*.bad..pattern",
            "a*..b.com",
        ] {
            assert_eq!(
                HostPattern::parse(p).err(),
                Some(PatternError::Empty),
                "{p}"
            );
        }
        assert_eq!(
            HostPattern::parse("API.Example.COM.").unwrap().as_str(),
            "api.example.com"
        );
    }

    /// The proxy reads a host ending in a number as an IPv4 address, as URL parsers do: a
    /// pattern of that shape that is not a valid address could never match and is refused.
    #[test]
    fn numeric_last_label_refused() {
        for p in [
            "300.1.1.1",
            "1.2.3.4.5",
            "example.123",
            ".0x7f",
            "*.10",
            "a.*.b.99",
        ] {
            assert!(
                matches!(HostPattern::parse(p), Err(PatternError::NotAnAddress(_))),
                "{p}"
            );
        }
        for p in ["example.com", "1.example.com", "x-1.io", "a.0xyz"] {
            assert!(HostPattern::parse(p).is_ok(), "{p}");
        }
    }

    /// A port or brackets in a pattern used to be accepted and then matched nothing: the host
    /// a request is matched by never carries them.
    #[test]
    fn ports_and_brackets_refused_with_the_spelling_to_use() {
        for (text, host, port) in [
            ("api.deepseek.com:443", "api.deepseek.com", 443),
            ("1.2.3.4:443", "1.2.3.4", 443),
            (".deepseek.com:8443", ".deepseek.com", 8443),
            ("*.openai.azure.com:443", "*.openai.azure.com", 443),
            ("[2001:db8::1]:443", "[2001:db8::1]", 443),
            (" API.DeepSeek.com:80 ", "API.DeepSeek.com", 80),
        ] {
            let e = HostPattern::parse(text).unwrap_err();
            assert_eq!(
                e,
                PatternError::Port {
                    pattern: text.to_string(),
                    host: host.to_string(),
                    port
                },
                "{text}"
            );
            assert!(e.to_string().contains(&format!("port = [{port}]")), "{e}");
        }
        for text in [
            "::1",
            "2001:db8::1",
            "[::1]",
            "[2001:db8::1]",
            "[::1]x:443",
            "[::1:443",
            "api.deepseek.com:",
            "api.deepseek.com:https",
            "api.deepseek.com:+443",
            "api.deepseek.com:70000",
            ":443",
            "a]b.com",
            "a[b.com",
            "a:b:443",
        ] {
            let e = HostPattern::parse(text).unwrap_err();
            assert_eq!(e, PatternError::NotAName(text.to_string()), "{text}");
            assert!(e.to_string().contains("port = [...]"), "{e}");
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*:generatecontent", "gemini:generatecontent"));
        assert!(!glob_match(
            "*:generatecontent",
            "gemini:streamgeneratecontent2"
        ));
        assert!(glob_match("a*b*c", "abc"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
