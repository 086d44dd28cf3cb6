//! Prompt DLP: which secret / PII patterns occur in a request-body prefix.
//!
//! The body is raw bytes (JSON, form-encoded or plain text, not necessarily
//! UTF-8), so everything here uses [`regex::bytes`]. A [`Scanner`] is built
//! once per policy and shared across requests; [`Scanner::scan`] does one
//! [`RegexSet`] pass over the body and only re-examines the body for patterns
//! whose regex alone is too weak (card numbers, which need Luhn and IIN
//! checks). A body with JSON escapes in it gets a second pass over a decoded
//! copy, since an escape can spell any character of a secret.
//!
//! Nothing in this module ever formats matched body text: [`Hits`] is a bit
//! set, and [`Scanner`]'s `Debug` shows pattern names only, so neither can
//! leak a secret into logs or audit records.

use regex::bytes::{Regex, RegexSet, RegexSetBuilder};
use std::fmt;

use super::model::escaped_char;

/// Names of the built-in patterns, in index order: built-in `i` has index `i`
/// in every [`Scanner`].
pub const BUILTINS: &[&str] = &[
    "private_key",
    "aws_access_key",
    "aws_secret_key",
    "gcp_service_account",
    "gcp_api_key",
    "github_token",
    "slack_token",
    "openai_key",
    "anthropic_key",
    "card_number",
];

/// One bit per pattern in [`Hits`], so this is a hard ceiling.
const MAX_PATTERNS: usize = 64;

/// Errors from building a [`Scanner`] or resolving pattern names.
///
/// None of these carry body text; `BadRegex` carries the policy's own regex
/// error, which quotes the pattern, not anything scanned.
#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error("unknown DLP pattern {0:?}; built in: {builtins}", builtins = BUILTINS.join(", "))]
    Unknown(String),
    #[error("DLP pattern {name:?}: {source}")]
    BadRegex {
        name: String,
        #[source]
        source: regex::Error,
    },
    #[error("more than 64 DLP patterns")]
    TooMany,
    #[error("duplicate DLP pattern name {0:?}")]
    Duplicate(String),
}

/// Set of pattern indices found (bit i = pattern i).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Hits(pub u64);

impl Hits {
    /// The set holding only pattern `i`.
    ///
    /// # Panics
    /// If `i >= 64`; scanner indices are always below that.
    pub const fn single(i: usize) -> Hits {
        assert!(i < MAX_PATTERNS, "DLP pattern index out of range");
        Hits(1 << i)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of patterns in the set.
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub const fn contains(self, i: usize) -> bool {
        i < MAX_PATTERNS && self.0 & (1 << i) != 0
    }

    /// Whether any pattern in `mask` is in `self`: the rule check
    /// "body hits any of these patterns".
    pub const fn intersects(self, mask: Hits) -> bool {
        self.0 & mask.0 != 0
    }

    /// Pattern indices in ascending order.
    pub fn iter(self) -> HitsIter {
        HitsIter(self.0)
    }
}

impl std::ops::BitOr for Hits {
    type Output = Hits;
    fn bitor(self, rhs: Hits) -> Hits {
        Hits(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Hits {
    fn bitor_assign(&mut self, rhs: Hits) {
        self.0 |= rhs.0;
    }
}

impl IntoIterator for Hits {
    type Item = usize;
    type IntoIter = HitsIter;
    fn into_iter(self) -> HitsIter {
        self.iter()
    }
}

/// Iterator over the indices in a [`Hits`], ascending.
#[derive(Clone, Debug)]
pub struct HitsIter(u64);

impl Iterator for HitsIter {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(i)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.0.count_ones() as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for HitsIter {}

/// Post-filter applied after the set reports a pattern may match.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Confirm {
    /// The set match is the verdict.
    Direct,
    /// Re-scan for a digit run that passes Luhn and IIN checks.
    Card,
}

/// Compiled DLP patterns: all built-ins, then the policy's custom ones.
///
/// Immutable after construction and `Send + Sync`, so one instance per policy
/// can be shared by every request worker.
pub struct Scanner {
    set: RegexSet,
    names: Vec<String>,
    confirm: Vec<Confirm>,
    card_runs: Regex,
}

impl fmt::Debug for Scanner {
    // Names only: the regex sources of custom patterns may themselves embed
    // sensitive literals (e.g. an internal hostname list).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("patterns", &self.names)
            .finish_non_exhaustive()
    }
}

impl Scanner {
    /// All built-ins, then the user's (name, regex) pairs in order. Index = position.
    ///
    /// Custom regexes are compiled as written (`regex` syntax, Unicode mode
    /// on). Prefer ASCII-only constructs such as `(?-u:\b)` in them: a
    /// Unicode word boundary makes the whole set fall back to a slower engine
    /// on non-ASCII input.
    pub fn new(custom: &[(String, String)]) -> Result<Scanner, DlpError> {
        if BUILTINS.len() + custom.len() > MAX_PATTERNS {
            return Err(DlpError::TooMany);
        }
        let mut names: Vec<String> = BUILTINS.iter().map(|s| (*s).to_owned()).collect();
        let mut sources = builtin_sources();
        let mut confirm: Vec<Confirm> = BUILTINS
            .iter()
            .map(|&n| {
                if n == "card_number" {
                    Confirm::Card
                } else {
                    Confirm::Direct
                }
            })
            .collect();
        for (name, re) in custom {
            if names.iter().any(|n| n == name) {
                return Err(DlpError::Duplicate(name.clone()));
            }
            // Compiled alone first so a syntax error is attributed to the
            // pattern that caused it; the set error would not say which.
            Regex::new(re).map_err(|source| DlpError::BadRegex {
                name: name.clone(),
                source,
            })?;
            names.push(name.clone());
            sources.push(re.clone());
            confirm.push(Confirm::Direct);
        }
        let set = match build_set(&sources) {
            Ok(set) => set,
            Err(e) => return Err(blame_set_error(&names, &sources, e)),
        };
        let card_runs = Regex::new(CARD_RUN).expect("built-in card run regex compiles");
        Ok(Scanner {
            set,
            names,
            confirm,
            card_runs,
        })
    }

    /// Index of the pattern called `name`, for compiling rule references
    /// into masks.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Mask of the named patterns; `Unknown` names the first one not found.
    pub fn mask<S: AsRef<str>>(&self, names: &[S]) -> Result<Hits, DlpError> {
        names.iter().try_fold(Hits::default(), |acc, n| {
            let n = n.as_ref();
            match self.index(n) {
                Some(i) => Ok(acc | Hits::single(i)),
                None => Err(DlpError::Unknown(n.to_owned())),
            }
        })
    }

    /// Name of pattern `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false: the built-ins are always present.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Which patterns occur in `body`, as sent or with its JSON escapes
    /// decoded.
    pub fn scan(&self, body: &[u8]) -> Hits {
        let mut hits = self.scan_bytes(body);
        // JSON lets a client spell any character as an escape (`\u002d` for
        // `-`; PHP writes `/` as `\/` by default), so a secret can hide from
        // the patterns in the raw bytes. Without a backslash there is no
        // escape, and the usual body costs one memchr more.
        if body.contains(&b'\\') {
            if let Some(decoded) = unescaped(body) {
                hits |= self.scan_bytes(&decoded);
            }
        }
        // A form body (or a query string) spells any byte as `%XX` and a
        // space as `+`: `-----BEGIN+RSA+PRIVATE+KEY-----`, `sk%2Dproj…`.
        if let Some(decoded) = form_decoded(body) {
            hits |= self.scan_bytes(&decoded);
            // A form field holding JSON: its escapes, once the form is decoded.
            if decoded.contains(&b'\\') {
                if let Some(both) = unescaped(&decoded) {
                    hits |= self.scan_bytes(&both);
                }
            }
        }
        hits
    }

    /// Which patterns occur in `body`, taken as it is.
    fn scan_bytes(&self, body: &[u8]) -> Hits {
        let mut hits = Hits::default();
        for i in self.set.matches(body).iter() {
            let found = match self.confirm[i] {
                Confirm::Direct => true,
                Confirm::Card => self.has_card(body),
            };
            if found {
                hits |= Hits::single(i);
            }
        }
        hits
    }

    /// Names of the patterns in `hits`, ascending by index. Indices this
    /// scanner does not have are skipped rather than panicking, since a
    /// `Hits` may come from elsewhere.
    pub fn names(&self, hits: Hits) -> impl Iterator<Item = &str> + '_ {
        hits.iter()
            .filter(move |&i| i < self.names.len())
            .map(move |i| self.names[i].as_str())
    }

    /// Every candidate digit run is checked, not just the first: an order
    /// number that fails Luhn must not hide a real card after it.
    fn has_card(&self, body: &[u8]) -> bool {
        self.card_runs.captures_iter(body).any(|c| {
            let run = c.get(1).expect("group 1 always participates");
            let tail_ok = body.get(run.end()).is_none_or(|&b| !is_word(b));
            run_has_card(run.as_bytes(), tail_ok)
        })
    }
}

/// `body` as a form decoder reads it (`+` a space, `%XX` the byte); `None`
/// when it has neither. One level, as the vendor decodes it.
fn form_decoded(body: &[u8]) -> Option<Vec<u8>> {
    if !body.iter().any(|&b| b == b'%' || b == b'+') {
        return None;
    }
    let spaced: Vec<u8> = body
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    Some(percent_encoding::percent_decode(&spaced).collect())
}

/// `body` with its JSON escapes decoded, lone surrogates as U+FFFD; `None`
/// when no escape decodes. A backslash that starts no valid escape stays
/// as it is, as does everything else: the body may be form-encoded or
/// plain text, and decoding only adds a second view of it. One level only:
/// `\\u002d` is the text `\u002d` to the vendor too.
fn unescaped(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    // `body[..copied]` is already in `out`, decoded.
    let mut copied = 0;
    let mut i = 0;
    while let Some(k) = body[i..].iter().position(|&c| c == b'\\') {
        let at = i + k;
        match escaped_char(body, at + 1) {
            Some((ch, next)) => {
                if out.capacity() == 0 {
                    // Every escape decodes to fewer bytes than it takes: one
                    // allocation holds the whole copy.
                    out.reserve_exact(body.len());
                }
                out.extend_from_slice(&body[copied..at]);
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                copied = next;
                i = next;
            }
            None => i = at + 1,
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

fn build_set(sources: &[String]) -> Result<RegexSet, regex::Error> {
    RegexSetBuilder::new(sources).build()
}

/// Every pattern compiled alone, yet the combined set failed: that can only
/// be the set's size limit. Find the custom pattern whose addition crosses
/// it, so the policy author knows which one to simplify. Size only grows as
/// patterns are added, so a binary search over prefixes finds it in
/// O(log n) rebuilds; this runs on the error path only.
fn blame_set_error(names: &[String], sources: &[String], mut err: regex::Error) -> DlpError {
    // Invariant: sources[..ok] builds (the built-ins alone always do),
    // sources[..bad] does not, and `err` is the error for sources[..bad].
    let (mut ok, mut bad) = (BUILTINS.len(), sources.len());
    while bad - ok > 1 {
        let mid = ok + (bad - ok) / 2;
        match build_set(&sources[..mid]) {
            Ok(_) => ok = mid,
            Err(e) => {
                bad = mid;
                err = e;
            }
        }
    }
    DlpError::BadRegex {
        name: names[bad - 1].clone(),
        source: err,
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Left boundary for token-like secrets. `\b` is not enough: in a JSON
/// string a newline is the two bytes `\n`, so `\nAKIA...` has a word byte
/// (`n`) before the key; form bodies have `%0A` likewise. Those escapes count
/// as a boundary. Being consumed rather than a look-behind (which `regex`
/// lacks) is fine for the set, which only reports membership. Escapes are
/// tried before the single-byte class so that `%0A4111...` takes `%0A` as the
/// boundary instead of starting a digit run at `0`.
const L: &str = r"(?:^|%[0-9A-Fa-f]{2}|\\[nrtbf]|[^0-9A-Za-z_])";

/// As [`L`] but a `.` is not a boundary: a digit run right after a `.` is the
/// fraction of a decimal (embedding vectors, probabilities), and 16–17
/// fraction digits pass Luhn one time in ten.
const L_CARD: &str = r"(?:^|%[0-9A-Fa-f]{2}|\\[nrtbf]|[^0-9A-Za-z_.])";

/// Digit runs (single space, `+`, `%20` or `-` between groups) for card
/// confirmation; `+` and `%20` are a space in form encoding. The run is maximal; which
/// sub-run is the card is decided by [`run_has_card`].
const CARD_RUN: &str =
    r"(?-u)(?:^|%[0-9A-Fa-f]{2}|\\[nrtbf]|[^0-9A-Za-z_.])([0-9]+(?:(?:[ +\-]|%20)[0-9]+)*)";

fn builtin_sources() -> Vec<String> {
    // `(?-u)`: byte semantics, so classes match non-UTF-8 bytes and `\b` is
    // ASCII, which keeps the set on the fast DFA for any input.
    //
    // Token patterns stop at their minimum distinctive length where no right
    // boundary is needed: the set only answers "present?", so matching the
    // whole token buys nothing.
    let quote = r#"(?:\\*"|%22)"#; // `"`, `\"` (JSON in a JSON string), `\\\"`, or form-encoded
    let ws = r"(?:\s|\\[nrt])*";
    let colon = r"(?::|%3[Aa])";
    let sa_type = format!("{quote}type{quote}{ws}{colon}{ws}{quote}service_account{quote}");
    let sa_key = format!("{quote}private_key{quote}{ws}{colon}");
    let v: Vec<String> = vec![
        // private_key
        r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,2}PRIVATE KEY(?: BLOCK)?-----".to_owned(),
        // aws_access_key
        format!(r"{L}(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{{16}}\b"),
        // aws_secret_key: the 40-char value alone is indistinguishable from
        // any base64 blob, so a label naming it is required.
        concat!(
            r"(?i:aws[_.\- ]?secret(?:[_.\- ]?access)?[_.\- ]?key|secret[_.\- ]?access[_.\- ]?key)",
            r#"(?:\\*["']|\s|\\[nrt])*(?:[:=]>?|%3[AaDd])(?:\\*["']|\s|\\[nrt]|%2[02])*"#,
            r"[A-Za-z0-9/+]{40}(?:$|[^A-Za-z0-9/+=])",
        )
        .to_owned(),
        // gcp_service_account: both markers, either order, anywhere; the
        // `.*` is a single DFA loop, so this stays linear.
        format!(r"(?s:{sa_type}.*{sa_key}|{sa_key}.*{sa_type})"),
        // gcp_api_key: `-` ends keys, and `\b` sees no boundary after it.
        format!(r"{L}AIza[0-9A-Za-z_\-]{{35}}(?:$|[^0-9A-Za-z_\-])"),
        // github_token
        format!(r"{L}(?:gh[pousr]_[A-Za-z0-9]{{36}}\b|github_pat_[A-Za-z0-9_]{{50}})"),
        // slack_token: a numeric first segment keeps "xoxb-your-token-here" out.
        format!(
            r"{L}(?:xox[bpars]|xapp)-[0-9]{{1,16}}-[0-9A-Za-z\-]{{10}}|hooks\.slack\.com\\?/services\\?/T[A-Z0-9]{{6,}}\\?/B[A-Z0-9]{{6,}}\\?/[A-Za-z0-9]{{16}}"
        ),
        // openai_key: `sk-ant-` cannot match either branch (`ant-` is neither
        // a known infix nor 48 alphanumerics).
        format!(r"{L}sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{{40}}|[A-Za-z0-9]{{48}}\b)"),
        // anthropic_key: any versioned kind (api03, admin01, and future
        // ones), since a new suffix is still a live credential.
        format!(r"{L}sk-ant-[a-z]{{2,10}}[0-9]{{2}}-[A-Za-z0-9_\-]{{64}}"),
        // card_number: deliberately looser than the confirmation (any 13–19
        // digits with single separators); it must never be stricter, or a
        // card the confirmation would accept is never looked at.
        format!(r"{L_CARD}[0-9](?:(?:[ +\-]|%20)?[0-9]){{12,18}}(?:$|[^0-9A-Za-z_])"),
    ];
    debug_assert_eq!(v.len(), BUILTINS.len());
    v.into_iter().map(|s| format!("(?-u){s}")).collect()
}

/// Whether some sub-run of `run` that starts at a group start and ends at a
/// group end is a plausible card. Sub-runs matter: in `order 12 4111 1111
/// 1111 1111` the card starts at the second group, and in `4111 1111 1111
/// 1111 123` (card then CVV) it ends before the last one. Each start looks at
/// no more than 19 digits, so this is linear in the run length.
fn run_has_card(run: &[u8], tail_ok: bool) -> bool {
    let mut start = 0;
    loop {
        if card_from(&run[start..], tail_ok) {
            return true;
        }
        match run[start..].iter().position(|b| !b.is_ascii_digit()) {
            Some(k) => start += k + sep_width(run[start + k]),
            None => return false,
        }
    }
}

/// Whether a card begins at the start of `s` (a digit-group run). `tail_ok`
/// says whether the end of `s` is a word boundary.
fn card_from(s: &[u8], tail_ok: bool) -> bool {
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut sep: Option<u8> = None;
    let mut groups = 0;
    let mut group_len = 0;
    // Printed cards group as 4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3: a separated
    // candidate needs a first group of 4 and inner groups of 3–6. Without
    // this, "2024 06 01 ..." style runs would be tried as cards.
    let mut inner_ok = true;
    let mut i = 0;
    loop {
        match s.get(i).copied() {
            Some(d @ b'0'..=b'9') => {
                if n == digits.len() {
                    return false;
                }
                digits[n] = d - b'0';
                n += 1;
                group_len += 1;
            }
            next => {
                groups += 1;
                let shape_ok = groups == 1 || inner_ok;
                let last_ok = groups == 1 || (1..=6).contains(&group_len);
                let bounded = next.is_some() || tail_ok;
                if n >= 13 && shape_ok && last_ok && bounded && plausible_card(&digits[..n]) {
                    return true;
                }
                let Some(c) = next else { return false };
                if groups == 1 {
                    inner_ok = group_len == 4;
                } else if !(3..=6).contains(&group_len) {
                    inner_ok = false;
                }
                // Mixed separators ("2024-06-01 1234") are not one number.
                if sep.is_some_and(|p| p != c) {
                    return false;
                }
                sep = Some(c);
                group_len = 0;
                i += sep_width(c);
                continue;
            }
        }
        i += 1;
    }
}

/// Bytes taken by the separator starting with `first`: `%20` is a space
/// as some form encoders write it (others use `+`).
fn sep_width(first: u8) -> usize {
    if first == b'%' {
        3
    } else {
        1
    }
}

/// Length, issuer range, Luhn, and not a repeated digit. `d` holds digit
/// values 0–9.
fn plausible_card(d: &[u8]) -> bool {
    if !(13..=19).contains(&d.len()) || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    iin_ok(d) && luhn_ok(d)
}

fn iin_ok(d: &[u8]) -> bool {
    let prefix = |k: usize| d[..k].iter().fold(0u32, |acc, &x| acc * 10 + u32::from(x));
    let (p2, p3, p4) = (prefix(2), prefix(3), prefix(4));
    let n = d.len();
    let visa = d[0] == 4 && matches!(n, 13 | 16 | 19);
    let mastercard = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && n == 16;
    let amex = (p2 == 34 || p2 == 37) && n == 15;
    let discover = (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3)) && (16..=19).contains(&n);
    let jcb = (3528..=3589).contains(&p4) && (16..=19).contains(&n);
    let diners = (p2 == 36 || p2 == 38 || (300..=305).contains(&p3)) && (14..=19).contains(&n);
    visa || mastercard || amex || discover || jcb || diners
}

fn luhn_ok(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALNUM: &[u8] = b"aB3dE5fG7hJ9kLmN2pQrS4tUvW6xYz8A1cD0";

    /// `len` characters cycled from `alphabet`, offset so different calls
    /// give different strings. Test secrets are built at run time so the
    /// source never holds anything a secret scanner would flag.
    fn filler(alphabet: &[u8], len: usize, offset: usize) -> String {
        (0..len)
            .map(|i| alphabet[(i * 7 + offset) % alphabet.len()] as char)
            .collect()
    }

    /// A form body spells the same secrets with `+` for spaces and `%XX` for
    /// any byte; the form-decoded view is scanned too.
    #[test]
    fn form_encoded_secrets_are_found() {
        let s = scanner();
        let key = format!("sk-proj-{}", "A".repeat(40));
        let encoded_key = key.replace('-', "%2D");
        for body in [
            "prompt=-----BEGIN+RSA+PRIVATE+KEY-----%0AMIIE".to_string(),
            "prompt=-----BEGIN%20RSA%20PRIVATE%20KEY-----%0AMIIE".to_string(),
            format!("prompt=hello+{encoded_key}+bye"),
            format!(
                "prompt={}",
                "%2D".repeat(5) + "BEGIN+PRIVATE+KEY" + &"%2D".repeat(5)
            ),
        ] {
            let hits = s.scan(body.as_bytes());
            assert!(!hits.is_empty(), "{body}");
        }
        assert!(s.scan(b"prompt=hello+world%21").is_empty());
        // JSON inside a form field: both decodings, one after the other.
        let nested = format!(
            "payload=%7B%22k%22%3A%22{}%22%7D",
            key.replace('-', "\\u002d")
        );
        assert!(!s.scan(nested.as_bytes()).is_empty(), "{nested}");
    }

    fn scanner() -> Scanner {
        Scanner::new(&[]).unwrap()
    }

    /// A JSON chat body whose user message holds `secret` between escaped
    /// newlines, the way a pasted file arrives.
    fn in_json(secret: &str) -> Vec<u8> {
        format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"please fix this config:\n{secret}\nthanks"}}]}}"#
        )
        .into_bytes()
    }

    fn hit_names(s: &Scanner, body: &[u8]) -> Vec<String> {
        s.names(s.scan(body)).map(str::to_owned).collect()
    }

    fn assert_hit(s: &Scanner, body: &[u8], name: &str) {
        let got = hit_names(s, body);
        assert!(
            got.iter().any(|n| n == name),
            "expected {name} in {got:?} for {:?}",
            String::from_utf8_lossy(body)
        );
    }

    fn assert_clean(s: &Scanner, body: &[u8]) {
        let got = hit_names(s, body);
        assert!(
            got.is_empty(),
            "expected no hits, got {got:?} for {:?}",
            String::from_utf8_lossy(body)
        );
    }

    fn positives() -> Vec<(&'static str, String)> {
        let gh = filler(ALNUM, 36, 1);
        let pat = format!(
            "github_pat_{}_{}",
            filler(ALNUM, 22, 2),
            filler(ALNUM, 59, 3)
        );
        let b64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let pem_body = filler(b64, 64, 4);
        let url_safe = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
        let sa = format!(
            r#"{{\n  \"type\": \"service_account\",\n  \"project_id\": \"demo-123\",\n  \"private_key_id\": \"{}\",\n  \"private_key\": \"-----BEGIN PRIVATE KEY-----\\n{}\\n-----END PRIVATE KEY-----\\n\"\n}}"#,
            filler(b"0123456789abcdef", 40, 5),
            pem_body
        );
        vec![
            (
                "private_key",
                format!("-----BEGIN RSA PRIVATE KEY-----\\n{pem_body}\\n-----END RSA PRIVATE KEY-----"),
            ),
            ("private_key", format!("-----BEGIN PRIVATE KEY-----\\n{pem_body}")),
            ("private_key", format!("-----BEGIN EC PRIVATE KEY-----\\n{pem_body}")),
            ("private_key", format!("-----BEGIN OPENSSH PRIVATE KEY-----\\n{pem_body}")),
            ("private_key", format!("-----BEGIN DSA PRIVATE KEY-----\\n{pem_body}")),
            ("private_key", format!("-----BEGIN ENCRYPTED PRIVATE KEY-----\\n{pem_body}")),
            ("private_key", format!("-----BEGIN PGP PRIVATE KEY BLOCK-----\\n\\n{pem_body}")),
            ("aws_access_key", "AKIAIOSFODNN7EXAMPLE".to_owned()),
            ("aws_access_key", format!("ASIA{}", "Y34FZKBOKMUTVV7A")),
            (
                "aws_secret_key",
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_owned(),
            ),
            (
                "aws_secret_key",
                r#"{\"AccessKeyId\": \"ASIAEXAMPLE\", \"SecretAccessKey\": \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"}"#
                    .to_owned(),
            ),
            ("aws_secret_key", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_owned()),
            ("gcp_service_account", sa),
            ("gcp_api_key", format!("AIza{}", filler(url_safe, 35, 6))),
            ("gcp_api_key", format!("key=AIza{}-", filler(url_safe, 34, 7))),
            ("github_token", format!("ghp_{gh}")),
            ("github_token", format!("gho_{gh}")),
            ("github_token", format!("ghs_{gh}")),
            ("github_token", pat),
            (
                "slack_token",
                format!("xoxb-123456789012-1234567890123-{}", filler(ALNUM, 24, 8)),
            ),
            (
                "slack_token",
                format!("xoxp-1234567890-1234567890-1234567890123-{}", filler(b"0123456789abcdef", 32, 9)),
            ),
            (
                "slack_token",
                format!("xapp-1-A0123ABCDEF-1234567890123-{}", filler(b"0123456789abcdef", 64, 10)),
            ),
            (
                "slack_token",
                format!("https://hooks.slack.com/services/T0{}/B0{}/{}", "1234567", "7654321", filler(ALNUM, 24, 11)),
            ),
            (
                "slack_token",
                format!(r"https:\/\/hooks.slack.com\/services\/T0{}\/B0{}\/{}", "1234567", "7654321", filler(ALNUM, 24, 12)),
            ),
            ("openai_key", format!("sk-{}", filler(ALNUM, 48, 13))),
            ("openai_key", format!("sk-proj-{}", filler(url_safe, 156, 14))),
            ("openai_key", format!("sk-svcacct-{}", filler(url_safe, 120, 15))),
            ("openai_key", format!("sk-admin-{}", filler(url_safe, 120, 16))),
            ("anthropic_key", format!("sk-ant-api03-{}AA", filler(url_safe, 93, 17))),
            ("anthropic_key", format!("sk-ant-admin01-{}AA", filler(url_safe, 93, 18))),
            ("card_number", "4111 1111 1111 1111".to_owned()),
            ("card_number", "5555-5555-5555-4444".to_owned()),
            ("card_number", "378282246310005".to_owned()),
            ("card_number", "3782 822463 10005".to_owned()),
            ("card_number", "6011111111111117".to_owned()),
            ("card_number", "3530111333300000".to_owned()),
            ("card_number", "30569309025904".to_owned()),
            ("card_number", "2223003122003222".to_owned()),
            ("card_number", "card: 4111111111111111, exp 12/29".to_owned()),
        ]
    }

    #[test]
    fn every_builtin_has_a_positive_case() {
        let p = positives();
        for b in BUILTINS {
            assert!(p.iter().any(|(n, _)| n == b), "no positive test for {b}");
        }
    }

    #[test]
    fn builtins_hit_in_json_plain_and_form() {
        let s = scanner();
        for (name, secret) in positives() {
            assert_hit(&s, &in_json(&secret), name);
            assert_hit(&s, secret.as_bytes(), name);
            assert_hit(&s, format!("a=1&b={secret}&c=2").as_bytes(), name);
        }
    }

    #[test]
    fn builtin_hits_are_specific() {
        // Each positive must hit only its own pattern, with the listed
        // exceptions where two patterns legitimately describe one secret.
        let s = scanner();
        for (name, secret) in positives() {
            let got = hit_names(&s, &in_json(&secret));
            let allowed: &[&str] = match name {
                "gcp_service_account" => &["gcp_service_account", "private_key"],
                "aws_secret_key" => &["aws_secret_key", "aws_access_key"],
                _ => &[name],
            };
            for g in &got {
                assert!(
                    allowed.contains(&g.as_str()),
                    "{name} case also hit {g}: {secret}"
                );
            }
        }
    }

    #[test]
    fn form_encoded_newline_is_a_boundary() {
        let s = scanner();
        assert_hit(&s, b"text=key%0AAKIAIOSFODNN7EXAMPLE%0A", "aws_access_key");
        assert_hit(&s, b"text=card%0A4111111111111111", "card_number");
        assert_hit(&s, b"text=card%204111%201111%201111%201111", "card_number");
        assert_hit(&s, b"text=card+4111+1111+1111+1111&x=1", "card_number");
    }

    /// Secrets spelled with JSON escapes, each paired with its pattern.
    /// None hits in the raw bytes; every one does once decoded.
    fn escaped_positives() -> Vec<(&'static str, String)> {
        let b64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let url_safe = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
        let pem = filler(b64, 64, 4);
        let d = r"\u002d";
        vec![
            (
                "private_key",
                format!(r"{d}----BEGIN PRIVATE KEY-----\n{pem}"),
            ),
            (
                "private_key",
                format!(r"\u002D----BEGIN PRIVATE KEY-----\n{pem}"),
            ),
            (
                "private_key",
                format!(r"-----BEGIN\u0020RSA PRIVATE KEY-----\n{pem}"),
            ),
            (
                "private_key",
                format!("{d}{d}{d}{d}{d}BEGIN PRIVATE KEY{d}{d}{d}{d}{d}"),
            ),
            (
                "openai_key",
                format!(r"sk{d}proj-{}", filler(url_safe, 156, 14)),
            ),
            ("openai_key", format!(r"\u0073k-{}", filler(ALNUM, 48, 13))),
            (
                "aws_secret_key",
                r"aws_secret_access_key = wJalrXUtnFEMI\/K7MDENG\/bPxRfiCYEXAMPLEKEY".to_owned(),
            ),
            ("aws_access_key", r"\u0041KIAIOSFODNN7EXAMPLE".to_owned()),
            // The only boundary before the key is a lone surrogate, or a pair.
            ("aws_access_key", r"x\ud800AKIAIOSFODNN7EXAMPLE".to_owned()),
            (
                "aws_access_key",
                r"x\ud83d\ude00AKIAIOSFODNN7EXAMPLE".to_owned(),
            ),
            (
                "github_token",
                format!(r"gh\u0070_{}", filler(ALNUM, 36, 1)),
            ),
            (
                "card_number",
                r"4111\u00201111\u00201111\u00201111".to_owned(),
            ),
        ]
    }

    #[test]
    fn json_escapes_do_not_hide_secrets() {
        let s = scanner();
        for (name, secret) in escaped_positives() {
            let idx = s.index(name).unwrap();
            assert!(
                !s.scan_bytes(secret.as_bytes()).contains(idx),
                "raw bytes already hit {name}, the case tests nothing: {secret}"
            );
            assert_hit(&s, secret.as_bytes(), name);
            assert_hit(&s, &in_json(&secret), name);
        }
    }

    #[test]
    fn bodies_without_escapes_scan_as_before() {
        let s = scanner();
        let mut bodies: Vec<Vec<u8>> = positives()
            .into_iter()
            .flat_map(|(_, p)| [p.clone().into_bytes(), format!("a=1&b={p}").into_bytes()])
            .collect();
        bodies.push(b"text=key%0AAKIAIOSFODNN7EXAMPLE%0A".to_vec());
        bodies.push(b"no secrets here, 4111111111111112".to_vec());
        // A backslash that starts no escape decodes to nothing new either.
        bodies.push(br"C:\Users\x AKIAIOSFODNN7EXAMPLE \q".to_vec());
        for body in bodies.iter().filter(|b| unescaped(b).is_none()) {
            assert_eq!(
                s.scan(body),
                s.scan_bytes(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(bodies.iter().filter(|b| unescaped(b).is_none()).count() > 20);
    }

    #[test]
    fn unescaping() {
        let cases: &[(&[u8], &[u8])] = &[
            (br"a\nb", b"a\nb"),
            (br#"\"\\\/\b\f\r\t"#, b"\"\\/\x08\x0c\r\t"),
            (br"caf\u00e9 \u00E9", "café é".as_bytes()),
            (br"\ud83d\ude00!", "😀!".as_bytes()),
            (br"\ud800x", "\u{FFFD}x".as_bytes()),
            (br"\udc00", "\u{FFFD}".as_bytes()),
            (br"\ud800\u0041", "\u{FFFD}A".as_bytes()),
            (br"\ud800\ud83d\ude00", "\u{FFFD}😀".as_bytes()),
            // One level: an escaped backslash does not start another escape.
            (br"\\u002d", br"\u002d"),
            // Bad or cut-off escapes stay as sent.
            (br"\x\n", b"\\x\n"),
            (br"\n\u00", b"\n\\u00"),
            (br"\n\ud800", b"\n\\ud800"),
            (br"\n\u12g4", b"\n\\u12g4"),
            (b"\xff\\n\xfe\\", b"\xff\n\xfe\\"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                unescaped(raw).as_deref(),
                Some(*want),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        for raw in [&b""[..], b"plain", br"C:\Users\x", br"trailing \", br"\u12"] {
            assert_eq!(unescaped(raw), None, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn non_utf8_body_still_scans() {
        let s = scanner();
        let mut body = vec![0xff, 0xfe, 0x80, b' '];
        body.extend_from_slice(b"AKIAIOSFODNN7EXAMPLE");
        body.extend_from_slice(&[0xc3, 0x28, b' ', b'4']);
        body.extend_from_slice(b"111111111111111");
        body.push(0x9f);
        let hits = s.scan(&body);
        assert!(hits.contains(s.index("aws_access_key").unwrap()));
        assert!(hits.contains(s.index("card_number").unwrap()));
    }

    #[test]
    fn later_card_found_after_failing_candidate() {
        let s = scanner();
        // The first two digit runs are card-shaped but fail Luhn; only the
        // third is real.
        let body =
            in_json("order 4111 1111 1111 1112 ref 5555555555554440 paid with 4111111111111111");
        assert_hit(&s, &body, "card_number");
        // Card inside a longer run: date prefix, CVV suffix.
        assert_hit(&s, b"on 2024 4111 1111 1111 1111 123", "card_number");
    }

    #[test]
    fn negatives_do_not_hit() {
        let s = scanner();
        let cases: Vec<String> = vec![
            "f47ac10b-58cc-4372-a567-0e02b2c3d479 and 123e4567-e89b-12d3-a456-426614174000".into(),
            // base64 blob, 40-char runs included, no label
            filler(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", 400, 1),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            "order #100234 shipped; order number 20240601-0042; invoice 9876543210".into(),
            "4111111111111112".into(),       // 16 digits, not Luhn-valid
            "1234567812345678".into(),       // not Luhn-valid, no IIN
            "0000 0000 0000 0000".into(),    // Luhn-valid but one digit repeated
            "4111111111111111111111".into(), // too long
            "41111111111111117".into(),      // Luhn-valid, 17 digits: no Visa length
            "id4111111111111111".into(),     // no left boundary
            "4111111111111111abc".into(),    // no right boundary
            "ts 1700000000000 and 1717171717171".into(),
            "[0.4111111111111111, 0.5555555555554444, -0.378282246310005]".into(),
            "call +1 415 555 0132 or 020 7946 0958".into(),
            "4111-1111 1111-1111".into(), // mixed separators
            "The quick brown fox discussed private keys, AWS secret access keys, and Slack tokens at length."
                .into(),
            "-----BEGIN PUBLIC KEY-----\\nMIIBIjANBgkq".into(),
            "-----BEGIN CERTIFICATE-----\\nMIIDdzCCAl+g".into(),
            "AKIAIOSFODNN7EXAMPLEX".into(), // too long to be a key id
            "xAKIAIOSFODNN7EXAMPLE".into(),
            "xoxb-your-token-here-please-replace".into(),
            "sk-1234".into(),
            format!("ghp_{}", filler(ALNUM, 20, 2)),
            r#"{\"type\": \"service_account\", \"project_id\": \"x\"}"#.into(),
            "aws_secret_access_key = <your secret here>".into(),
        ];
        for c in &cases {
            assert_clean(&s, &in_json(c));
            assert_clean(&s, c.as_bytes());
        }
    }

    #[test]
    fn anthropic_key_is_not_openai() {
        let s = scanner();
        let url_safe = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
        for tail in [
            filler(url_safe, 95, 3),
            filler(ALNUM, 95, 4),
            filler(ALNUM, 48, 5),
        ] {
            for prefix in ["sk-ant-api03-", "sk-ant-admin01-", "sk-ant-"] {
                let body = in_json(&format!("{prefix}{tail}"));
                let got = hit_names(&s, &body);
                assert!(
                    !got.contains(&"openai_key".to_owned()),
                    "{prefix}{tail}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn custom_patterns_follow_builtins() {
        let custom = vec![
            (
                "internal_host".to_owned(),
                r"(?-u)\bcorp\.internal\.example\b".to_owned(),
            ),
            ("project_code".to_owned(), r"PRJ-[0-9]{6}".to_owned()),
        ];
        let s = Scanner::new(&custom).unwrap();
        assert_eq!(s.len(), BUILTINS.len() + 2);
        assert_eq!(s.index("internal_host"), Some(BUILTINS.len()));
        assert_eq!(s.index("project_code"), Some(BUILTINS.len() + 1));
        assert_eq!(s.name(BUILTINS.len()), "internal_host");
        for (i, b) in BUILTINS.iter().enumerate() {
            assert_eq!(s.index(b), Some(i));
            assert_eq!(s.name(i), *b);
        }
        let body =
            in_json("ssh to db1.corp.internal.example about PRJ-123456 with AKIAIOSFODNN7EXAMPLE");
        let got: Vec<&str> = s.names(s.scan(&body)).collect();
        assert_eq!(got, ["aws_access_key", "internal_host", "project_code"]);
        assert_clean(&s, b"PRJ-12 on corp.internal");
    }

    #[test]
    fn masks_and_unknown_names() {
        let s = scanner();
        let m = s.mask(&["openai_key", "anthropic_key"]).unwrap();
        assert_eq!(m.len(), 2);
        let hits = s.scan(&in_json(&format!("sk-proj-{}", filler(ALNUM, 60, 1))));
        assert!(hits.intersects(m));
        assert!(!hits.intersects(s.mask(&["card_number"]).unwrap()));
        let err = s.mask(&["openai_key", "nope"]).unwrap_err();
        assert!(matches!(&err, DlpError::Unknown(n) if n == "nope"));
        let msg = err.to_string();
        for b in BUILTINS {
            assert!(msg.contains(b), "{msg}");
        }
        assert_eq!(s.index("nope"), None);
    }

    #[test]
    fn construction_errors() {
        let bad = Scanner::new(&[("broken".into(), "(unclosed".into())]).unwrap_err();
        match &bad {
            DlpError::BadRegex { name, .. } => assert_eq!(name, "broken"),
            e => panic!("{e}"),
        }
        assert!(bad.to_string().starts_with("DLP pattern \"broken\": "));
        assert!(std::error::Error::source(&bad).is_some());

        let dup = Scanner::new(&[("a".into(), "x".into()), ("a".into(), "y".into())]).unwrap_err();
        assert!(matches!(&dup, DlpError::Duplicate(n) if n == "a"));
        let dup_builtin = Scanner::new(&[("card_number".into(), "x".into())]).unwrap_err();
        assert!(matches!(&dup_builtin, DlpError::Duplicate(n) if n == "card_number"));

        let fits: Vec<(String, String)> = (0..MAX_PATTERNS - BUILTINS.len())
            .map(|i| (format!("p{i}"), format!("tok{i}x")))
            .collect();
        let s = Scanner::new(&fits).unwrap();
        assert_eq!(s.len(), 64);
        assert!(s.scan(b"tok53x").contains(63));
        let mut too_many = fits.clone();
        too_many.push(("one_more".into(), "z".into()));
        assert!(matches!(Scanner::new(&too_many), Err(DlpError::TooMany)));
        assert_eq!(DlpError::TooMany.to_string(), "more than 64 DLP patterns");
    }

    #[test]
    fn oversized_set_is_blamed_on_a_pattern() {
        // Each compiles alone under the default size limit (Unicode `\w` is
        // large), but the third pushes the combined set over it.
        let custom: Vec<(String, String)> = (0..4)
            .map(|i| (format!("big{i}"), r"\w{100}".to_owned()))
            .collect();
        match Scanner::new(&custom) {
            Err(DlpError::BadRegex { name, .. }) => assert_eq!(name, "big2"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("expected the combined set to exceed the size limit"),
        }
    }

    #[test]
    fn nothing_prints_body_text() {
        let secret = "AKIAIOSFODNN7EXAMPLE";
        let s = Scanner::new(&[("mine".into(), "AKIA".into())]).unwrap();
        let hits = s.scan(secret.as_bytes());
        assert!(!format!("{s:?}").contains("AKIA"));
        assert!(!format!("{hits:?}").contains("AKIA"));
        let names: Vec<&str> = s.names(hits).collect();
        assert_eq!(names, ["aws_access_key", "mine"]);
    }

    #[test]
    fn hits_set_operations() {
        let h = Hits::single(0) | Hits::single(5) | Hits::single(63);
        assert_eq!(h.iter().collect::<Vec<_>>(), [0, 5, 63]);
        assert_eq!(h.iter().len(), 3);
        assert_eq!(h.len(), 3);
        assert!(h.contains(63) && !h.contains(1) && !h.contains(64));
        assert!(h.intersects(Hits::single(5)));
        assert!(!h.intersects(Hits::single(4)));
        assert!(Hits::default().is_empty());
        assert!(!h.is_empty());
        let s = scanner();
        // Out-of-range bits are skipped, not a panic.
        assert_eq!(
            s.names(Hits((1 << 63) | 1)).collect::<Vec<_>>(),
            ["private_key"]
        );
    }

    #[test]
    fn scanner_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Scanner>();
        check::<DlpError>();
    }

    #[test]
    fn luhn_and_iin() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<u8>>();
        assert!(luhn_ok(&digits("4111111111111111")));
        assert!(!luhn_ok(&digits("4111111111111112")));
        assert!(luhn_ok(&digits("0000000000000000")));
        assert!(!plausible_card(&digits("0000000000000000")));
        for ok in [
            "4111111111111111",
            "5105105105105100",
            "2720990000000007",
            "378282246310005",
            "6011000990139424",
            "6445644564456445",
            "3566002020360505",
            "36227206271667",
            "30569309025904",
        ] {
            assert!(plausible_card(&digits(ok)), "{ok}");
        }
        // Luhn-valid but no issuer: 9-prefixed, Mastercard length 15, etc.
        for bad in ["9111111111111119", "510510510510515", "7992739871300000"] {
            assert!(!iin_ok(&digits(bad)), "{bad}");
        }
    }

    #[test]
    fn adversarial_runs_stay_linear() {
        // Long digit/separator runs exercise the per-start loop; these
        // would take seconds if it were quadratic.
        let s = scanner();
        let body = "1 ".repeat(500_000);
        let t = std::time::Instant::now();
        assert!(s.scan(body.as_bytes()).is_empty());
        let body = "1234 ".repeat(200_000);
        assert!(s.scan(body.as_bytes()).is_empty());
        let body = "7".repeat(1 << 20);
        assert!(s.scan(body.as_bytes()).is_empty());
        assert!(t.elapsed().as_secs() < 30);
    }

    fn prompt_64k(with_hits: bool) -> Vec<u8> {
        let para = "Summarise the following meeting notes. The team discussed the Q3 roadmap, \
                    latency budgets of 250 ms, the migration of service 42 to the new cluster, \
                    and action items for 2024-06-01. Nobody mentioned any credentials.\\n";
        let mut content = String::new();
        let mut i = 0;
        while content.len() < 64 * 1024 - 256 {
            content.push_str(para);
            if with_hits && i % 40 == 20 {
                content.push_str("AKIAIOSFODNN7EXAMPLE and card 4111 1111 1111 1111\\n");
            }
            i += 1;
        }
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{content}"}}],"temperature":0.2}}"#)
            .into_bytes()
    }

    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_scan_64k() {
        let s = scanner();
        for (label, body) in [
            ("no hits", prompt_64k(false)),
            ("with hits", prompt_64k(true)),
        ] {
            let iters = 200;
            let mut found = Hits::default();
            // Warm the lazy DFA cache the way a long-running proxy would.
            found |= s.scan(&body);
            let t = std::time::Instant::now();
            for _ in 0..iters {
                found |= std::hint::black_box(s.scan(std::hint::black_box(&body)));
            }
            let ns = t.elapsed().as_nanos() as f64 / (iters as f64 * body.len() as f64);
            let names: Vec<&str> = s.names(found).collect();
            println!(
                "dlp scan, {label}: {} bytes, {ns:.3} ns/byte, hits {names:?}",
                body.len()
            );
        }
    }
}
