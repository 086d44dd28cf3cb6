//! Bounded extraction of the top-level `"model"` field from a JSON body.
//!
//! Policy is keyed on the model an OpenAI / Anthropic / Gemini style request
//! names, but the proxy only holds a prefix of the body and must not pay for
//! (or allocate for) a full parse on every request. This is a small
//! iterative scanner: it walks the top-level object's members, skips each
//! value without descending into it recursively, and stops at the first
//! member whose key decodes to `model`. Work is O(n) in the prefix and the
//! stack depth is constant whatever the nesting, so hostile input cannot
//! make it slow or overflow the stack.
//!
//! Agreement with the vendor's parser is what matters for security: a body
//! that the vendor reads as naming model X must never be reported here as
//! naming model Y. Hence keys are compared after escape decoding
//! (`"mod\u0065l"` is `model` to every JSON parser), and lone surrogate
//! escapes, which Python's and JavaScript's parsers accept, are read rather
//! than rejected.
//!
//! Where the vendor's reading cannot be vouched for, [`model_ambiguous`]
//! says so and the proxy refuses the body rather than guess: a top-level
//! `model` named twice (parsers disagree: Python's and JavaScript's keep the
//! last, [`model`] reports the first), or a top-level object this scanner
//! finds malformed, since a more lenient parser may still find a `model` in
//! it. The end of a truncated prefix is not malformed: a duplicate beyond
//! the buffered prefix cannot be seen, and the prefix cap is the documented
//! limit of body rules.

use std::borrow::Cow;

mod nested;
pub use nested::{models_at, FieldPath, Nested};

/// Longest model name accepted, in decoded bytes. Real names are far
/// shorter; the cap bounds the work and the one allocation.
const MAX_VALUE: usize = 256;

/// The top-level "model" value of a JSON object, if present within `body` (which may be a truncated prefix). Escapes decoded (Cow::Owned only then). Nested "model" keys (inside messages, tools, metadata, string values containing "model") must NOT match. Returns None for non-objects, malformed input before the key, non-string values, values longer than 256 bytes, or invalid UTF-8.
///
/// A leading UTF-8 byte-order mark is skipped, as lenient producers emit one.
/// A lone surrogate escape in the value reads as U+FFFD.
pub fn model(body: &[u8]) -> Option<Cow<'_, str>> {
    let mut members = Members::new(body)?;
    loop {
        let m = members.next().ok()?;
        if m.key == Key::Model {
            if body.get(m.value) != Some(&b'"') {
                return None;
            }
            return value(body, m.value + 1);
        }
    }
}

/// Whether [`model`]'s answer cannot be trusted to be the model the vendor
/// reads: the top-level object names `model` more than once (keys compared
/// after escape decoding, as in [`model`]), or is malformed before the end
/// of `body`. Malformed means in its structure (separators, brackets), in
/// a key as far as it is read to compare it with `model`, or in the part of
/// the first `model` value [`model`] reads; other string contents are not
/// checked. Non-objects, and the end of a truncated prefix, are not
/// ambiguous.
pub fn model_ambiguous(body: &[u8]) -> bool {
    let Some(mut members) = Members::new(body) else {
        return false;
    };
    let mut seen = false;
    loop {
        match members.next() {
            Ok(m) if m.key == Key::Model => {
                if seen || bad_string(body, m.value) {
                    return true;
                }
                seen = true;
            }
            // `Model`, `MODEL`: Go's encoding/json (Ollama, many gateways) matches field
            // names regardless of case, and takes the last.
            Ok(m) if m.key == Key::ModelInOtherCase => return true,
            Ok(_) => {}
            Err(stop) => return stop == Stop::Malformed,
        }
    }
}

/// Why a walk of the top-level object's members ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    /// Its closing brace: every member was seen.
    Closed,
    /// The prefix ran out: what follows is unknown, not wrong.
    Truncated,
    /// Not JSON, so nothing says the vendor's parser reads it as we would.
    Malformed,
}

/// What a top-level member's key is, decoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Key {
    Model,
    /// `Model`, `MODEL`: the model to parsers that ignore case.
    ModelInOtherCase,
    Other,
}

/// One top-level member.
struct Member {
    key: Key,
    /// Where its key starts (just past its opening quote).
    key_at: usize,
    /// Where its value starts.
    value: usize,
}

/// The top-level object's members in order. Values are skipped, never
/// descended into, so nested keys are never seen.
struct Members<'a> {
    b: &'a [u8],
    /// Start of the next member's key, or of the last member's value once
    /// one has been returned.
    i: usize,
    started: bool,
}

impl<'a> Members<'a> {
    /// `None` when the body is not an object at all.
    fn new(b: &'a [u8]) -> Option<Members<'a>> {
        let i = first_member(b)?;
        Some(Members {
            b,
            i,
            started: false,
        })
    }

    /// The members of the object whose opening brace is at `i` (a nested one).
    fn at(b: &'a [u8], i: usize) -> Members<'a> {
        Members {
            b,
            i: skip_ws(b, i + 1),
            started: false,
        }
    }

    fn next(&mut self) -> Result<Member, Stop> {
        let b = self.b;
        if self.started {
            let i = skip_ws(b, skip_value(b, self.i)?);
            if b.get(i) == Some(&b'}') {
                return Err(Stop::Closed);
            }
            expect(b, i, b',')?;
            // After a comma a key must follow: `}` here is a trailing comma.
            self.i = skip_ws(b, i + 1);
        } else if b.get(self.i) == Some(&b'}') {
            return Err(Stop::Closed);
        }
        self.started = true;
        expect(b, self.i, b'"')?;
        let key_at = self.i + 1;
        let (key, after_key) = key(b, key_at)?;
        let i = skip_ws(b, after_key);
        expect(b, i, b':')?;
        self.i = skip_ws(b, i + 1);
        Ok(Member {
            key,
            key_at,
            value: self.i,
        })
    }
}

/// Whether `b[i]` is `c`; the end of the prefix is not an error of the body.
fn expect(b: &[u8], i: usize, c: u8) -> Result<(), Stop> {
    match b.get(i) {
        Some(&x) if x == c => Ok(()),
        Some(_) => Err(Stop::Malformed),
        None => Err(Stop::Truncated),
    }
}

/// Where the top-level object's first member starts: past a byte-order mark, whitespace and
/// the opening brace. `None` when the body is not an object.
fn first_member(body: &[u8]) -> Option<usize> {
    let start = if body.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let i = skip_ws(body, start);
    (body.get(i) == Some(&b'{')).then(|| skip_ws(body, i + 1))
}

/// RFC 8259 whitespace only; anything else (NBSP, form feed) is malformed
/// to the vendor too.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// What the key string starting at `i` (just past its quote) decodes to, and the index past
/// its closing quote.
fn key(b: &[u8], i: usize) -> Result<(Key, usize), Stop> {
    let mut buf = [0u8; 5];
    match decode(b, i, &mut buf) {
        Ok(d) => {
            let k = match &buf[..d.len] {
                b"model" => Key::Model,
                k if k.eq_ignore_ascii_case(b"model") => Key::ModelInOtherCase,
                _ => Key::Other,
            };
            Ok((k, d.end))
        }
        Err(DecodeError::Overflow) => Ok((Key::Other, string_end(b, i).ok_or(Stop::Truncated)?)),
        Err(DecodeError::Truncated) => Err(Stop::Truncated),
        Err(DecodeError::Invalid) => Err(Stop::Malformed),
    }
}

/// The model value: the string starting at `i` (just past its quote).
fn value(b: &[u8], i: usize) -> Option<Cow<'_, str>> {
    let mut buf = [0u8; MAX_VALUE];
    let d = decode(b, i, &mut buf).ok()?;
    if d.escaped {
        String::from_utf8(buf[..d.len].to_vec())
            .ok()
            .map(Cow::Owned)
    } else {
        std::str::from_utf8(&b[i..d.end - 1])
            .ok()
            .map(Cow::Borrowed)
    }
}

/// Whether the value at `i` is a string [`value`] cannot read: a bad escape or raw control
/// character, or longer than [`MAX_VALUE`]. [`model`] then answers `None`, which must not
/// pass for "no model named": `gpt-4o-` and 300 more bytes is still a `gpt-4o*` model.
fn bad_string(b: &[u8], i: usize) -> bool {
    b.get(i) == Some(&b'"')
        && matches!(
            decode(b, i + 1, &mut [0u8; MAX_VALUE]),
            Err(DecodeError::Invalid | DecodeError::Overflow)
        )
}

/// Index past the closing quote of the string starting at `i` (just past its
/// opening quote), without decoding: used for strings whose content does
/// not matter. `None` when the prefix ends first.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += b.get(i..)?.iter().position(|&c| c == b'"' || c == b'\\')?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        // The escaped byte is never a terminator; `\uXXXX` digits cannot be
        // `"` or `\` either, so skipping one byte is enough.
        i += 2;
    }
}

/// Index past the value starting at `i`. Containers are skipped by bracket
/// counting with a plain counter: it only has to find where the value ends
/// in well-formed input, and a vendor rejects mismatched brackets anyway.
fn skip_value(b: &[u8], mut i: usize) -> Result<usize, Stop> {
    match *b.get(i).ok_or(Stop::Truncated)? {
        b'"' => string_end(b, i + 1).ok_or(Stop::Truncated),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                i += b
                    .get(i..)
                    .and_then(|rest| {
                        rest.iter()
                            .position(|&c| matches!(c, b'"' | b'{' | b'}' | b'[' | b']'))
                    })
                    .ok_or(Stop::Truncated)?;
                match b[i] {
                    b'"' => i = string_end(b, i + 1).ok_or(Stop::Truncated)?,
                    b'{' | b'[' => {
                        depth += 1;
                        i += 1;
                    }
                    _ => {
                        depth = depth.checked_sub(1).ok_or(Stop::Malformed)?;
                        i += 1;
                        if depth == 0 {
                            return Ok(i);
                        }
                    }
                }
            }
        }
        _ => {
            // Numbers and literals; their exact grammar is irrelevant to
            // finding the next member.
            let n = b[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
                .count();
            if n == 0 {
                return Err(Stop::Malformed);
            }
            Ok(i + n)
        }
    }
}

enum DecodeError {
    /// Decoded content does not fit the buffer.
    Overflow,
    /// Bad escape or raw control character.
    Invalid,
    /// The prefix ends inside the string.
    Truncated,
}

struct Decoded {
    /// Bytes written to the buffer.
    len: usize,
    /// Index past the closing quote.
    end: usize,
    /// Whether any escape occurred, i.e. whether the raw bytes differ from
    /// the decoded ones.
    escaped: bool,
}

/// Decodes the JSON string starting at `i` (just past its opening quote)
/// into `out`. Raw bytes are copied as is; UTF-8 validity is the caller's
/// check, done once on the result.
fn decode(b: &[u8], mut i: usize, out: &mut [u8]) -> Result<Decoded, DecodeError> {
    let mut len = 0;
    let mut escaped = false;
    loop {
        let c = *b.get(i).ok_or(DecodeError::Truncated)?;
        match c {
            b'"' => {
                return Ok(Decoded {
                    len,
                    end: i + 1,
                    escaped,
                })
            }
            b'\\' => {
                let (ch, next) = escape(b, i + 1)?;
                escaped = true;
                len = push(out, len, ch.encode_utf8(&mut [0; 4]).as_bytes())?;
                i = next;
            }
            0..=0x1F => return Err(DecodeError::Invalid),
            _ => {
                len = push(out, len, &[c])?;
                i += 1;
            }
        }
    }
}

/// Appends `bytes` to the `len` bytes already in `out`; the new length.
fn push(out: &mut [u8], len: usize, bytes: &[u8]) -> Result<usize, DecodeError> {
    let end = len + bytes.len();
    out.get_mut(len..end)
        .ok_or(DecodeError::Overflow)?
        .copy_from_slice(bytes);
    Ok(end)
}

/// The character a JSON escape stands for and the index past the escape;
/// `i` is just past its backslash. `None` when malformed or cut off.
/// DLP decodes with this too, so that both read escapes alike.
pub(super) fn escaped_char(b: &[u8], i: usize) -> Option<(char, usize)> {
    escape(b, i).ok()
}

/// As [`escaped_char`], telling a bad escape from a cut-off one.
fn escape(b: &[u8], i: usize) -> Result<(char, usize), DecodeError> {
    let ch = match *b.get(i).ok_or(DecodeError::Truncated)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => return unicode(b, i + 1),
        _ => return Err(DecodeError::Invalid),
    };
    Ok((ch, i + 1))
}

/// The `\uXXXX` escape whose digits start at `i`, joined with a following
/// low surrogate escape into one character. A lone surrogate reads as
/// U+FFFD rather than an error: Python's and JavaScript's parsers accept
/// it, so rejecting it would hide every key after it from us and not from
/// the vendor. No string holding one can equal `model` either way.
fn unicode(b: &[u8], i: usize) -> Result<(char, usize), DecodeError> {
    let hi = hex4(b, i)?;
    let i = i + 4;
    if !(0xD800..0xDC00).contains(&hi) {
        // Only a lone low surrogate is not a char.
        return Ok((char::from_u32(hi).unwrap_or(char::REPLACEMENT_CHARACTER), i));
    }
    match low_surrogate(b, i)? {
        Some(lo) => {
            let c = char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                .ok_or(DecodeError::Invalid)?;
            Ok((c, i + 6))
        }
        None => Ok((char::REPLACEMENT_CHARACTER, i)),
    }
}

/// The low surrogate escaped at `i`, if one is; a different escape there is
/// left for the caller's next step. `Truncated` when the prefix ends before
/// it can be told.
fn low_surrogate(b: &[u8], i: usize) -> Result<Option<u32>, DecodeError> {
    let rest = b.get(i..).unwrap_or_default();
    if rest.is_empty() || rest == b"\\" {
        return Err(DecodeError::Truncated);
    }
    if !rest.starts_with(b"\\u") {
        return Ok(None);
    }
    let lo = hex4(b, i + 2)?;
    Ok((0xDC00..0xE000).contains(&lo).then_some(lo))
}

fn hex4(b: &[u8], i: usize) -> Result<u32, DecodeError> {
    (i..i + 4).try_fold(0u32, |acc, k| {
        let d = *b.get(k).ok_or(DecodeError::Truncated)?;
        let v = (d as char).to_digit(16).ok_or(DecodeError::Invalid)?;
        Ok(acc * 16 + v)
    })
}

// ---------------------------------------------------------------------------------------------
// Form bodies: OpenAI's audio, image and upload endpoints take `model` as a form field.

/// What a form body says about its `model` field.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field is there, readable or not.
    pub named: bool,
    /// The field's value: named once, complete in the prefix, UTF-8 and at most 256 bytes.
    pub model: Option<String>,
    /// Named more than once, or in a spelling form parsers differ on (another case, a quoted
    /// escape, `name*=`), or the form is malformed where it is read: which `model` the vendor
    /// reads, if any, cannot be vouched for.
    pub ambiguous: bool,
}

impl Field {
    fn doubtful() -> Field {
        Field {
            named: true,
            model: None,
            ambiguous: true,
        }
    }
}

/// How a form field's name relates to `model`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Name {
    Model,
    /// Not `model` as sent, but `model` to some parser (case-insensitive binders, a second
    /// round of percent-decoding, backslash escapes in a quoted name).
    LooksLike,
    Other,
}

/// Classifies a field name already decoded the way the form's own rules say.
fn name_kind(decoded: &[u8]) -> Name {
    if decoded == b"model" {
        return Name::Model;
    }
    let again = percent_decode(decoded, false);
    if decoded.eq_ignore_ascii_case(b"model") || again.eq_ignore_ascii_case(b"model") {
        Name::LooksLike
    } else {
        Name::Other
    }
}

/// `%XX` decoded (an invalid escape stays as it is, as in Python's `unquote`), and `+` as a
/// space when `plus` (form encoding).
fn percent_decode(b: &[u8], plus: bool) -> Cow<'_, [u8]> {
    if !b.iter().any(|&c| c == b'%' || (plus && c == b'+')) {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |k: usize| b.get(k).and_then(|&c| (c as char).to_digit(16));
        match b[i] {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// A field value as the model: UTF-8 and at most [`MAX_VALUE`] bytes, else `None` (as for a
/// JSON value).
fn field_value(v: &[u8]) -> Option<String> {
    (v.len() <= MAX_VALUE)
        .then(|| std::str::from_utf8(v).ok().map(str::to_owned))
        .flatten()
}

/// The `model` field of an `application/x-www-form-urlencoded` body (a query string has the
/// same form). Pairs are split at `&` and at `;` (older Python parsers split there too), names
/// and values percent-decoded with `+` as a space. `complete`: `body` is the whole body; else
/// its last pair may be cut short and is not read.
pub fn form_model(body: &[u8], complete: bool) -> Field {
    let mut out = Field::default();
    let mut pairs = body.split(|&c| c == b'&' || c == b';').peekable();
    while let Some(pair) = pairs.next() {
        if pairs.peek().is_none() && !complete {
            break;
        }
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|&c| c == b'=') {
            Some(k) => (&pair[..k], &pair[k + 1..]),
            None => (pair, &b""[..]),
        };
        match name_kind(&percent_decode(name, true)) {
            Name::Other => {}
            Name::LooksLike => return Field::doubtful(),
            // The same value again (`?model=x&model=x`, as a client that appends to a URL
            // may send) is read alike by first-wins and last-wins parsers. Not across a `;`,
            // which Python since 3.10 does not split at: to it the first value runs on.
            Name::Model if out.named => {
                let again = field_value(&percent_decode(value, true));
                if again.is_none() || again != out.model || body.contains(&b';') {
                    return Field::doubtful();
                }
            }
            Name::Model => {
                out.named = true;
                out.model = field_value(&percent_decode(value, true));
                // Named, and not a value we can read (too long, not UTF-8): not "no model".
                out.ambiguous = out.model.is_none();
            }
        }
    }
    out
}

/// The values of the fields of a urlencoded body named `name` (decoded, in any case).
pub fn form_fields<'b>(body: &'b [u8], name: &'b str) -> impl Iterator<Item = Cow<'b, [u8]>> {
    body.split(|&c| c == b'&' || c == b';')
        .filter_map(move |pair| {
            let (n, v) = match pair.iter().position(|&c| c == b'=') {
                Some(k) => (&pair[..k], &pair[k + 1..]),
                None => (pair, &b""[..]),
            };
            percent_decode(n, true)
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| percent_decode(v, true))
        })
}

/// RFC 2046 boundary characters (`bchars`).
fn bchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c)
}

/// Where the next delimiter line (`CRLF--boundary`) starts, at or after `from`: `Ok(None)` when
/// the prefix ends first. `Err` where parsers differ on whether a part ends: `--boundary`
/// anywhere but after CRLF (Werkzeug also takes it after a bare LF or CR, and in the preamble
/// after anything at all; RFC 2046 and python-multipart do not), or followed by something
/// other than `--`, white space or CRLF.
fn next_delimiter(b: &[u8], from: usize, boundary: &[u8]) -> Result<Option<usize>, ()> {
    let mut dashed = Vec::with_capacity(2 + boundary.len());
    dashed.extend_from_slice(b"--");
    dashed.extend_from_slice(boundary);
    let Some(k) = memchr::memmem::find(b.get(from..).unwrap_or_default(), &dashed) else {
        return Ok(None);
    };
    let at = from + k;
    if at < from + 2 || &b[at - 2..at] != b"\r\n" {
        return Err(());
    }
    match b.get(at + dashed.len()) {
        None | Some(b'-' | b' ' | b'\t' | b'\r') => Ok(Some(at - 2)),
        Some(_) => Err(()),
    }
}

/// An RFC 9110 `tchar`: what a header name, a parameter name or a bare value is made of.
fn token(c: &u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c)
}

/// Whether a `;`-separated parameter list (a Content-Type, a part's Content-Disposition) is
/// spelled so that every parser splits it alike: RFC 9110's grammar with nothing the
/// lenient readers take otherwise. Werkzeug keeps only the leading token of a bare value
/// (`name=model/x` is `model` to it) and opens a quoted value only straight after a token and
/// `=`; Go trims Unicode white space around values; python-multipart decides what is quoted
/// by counting quotes, so a `\\"` inside one hides a quote from it. So: every name and bare
/// value a token, no white space after `=`, no `\\"` inside a quoted value, and no escape at
/// all but in a file name. Otherwise a `; name=model`, a `; name=purpose` or a second
/// `; boundary=` could stand as a parameter for one parser and not for another.
pub(crate) fn plainly_spelled(v: &[u8]) -> bool {
    let Some((essence, ps)) = params(v) else {
        return false;
    };
    if !essence.iter().all(|c| token(c) || *c == b'/')
        || ps
            .iter()
            .any(|(n, _, escaped)| *escaped && !n.starts_with(b"filename"))
    {
        return false;
    }
    let ows = |v: &[u8], mut i: usize| {
        while matches!(v.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        i
    };
    let Some(mut i) = memchr::memchr(b';', v) else {
        return true;
    };
    while i < v.len() {
        // At a `;`.
        i = ows(v, i + 1);
        if i == v.len() {
            return true;
        }
        let name = i;
        while v.get(i).is_some_and(token) {
            i += 1;
        }
        i = ows(v, i);
        if i == name || v.get(i) != Some(&b'=') {
            return false;
        }
        i += 1;
        if v.get(i) == Some(&b'"') {
            let open = i;
            i += 1;
            loop {
                match v.get(i) {
                    None => return false,
                    Some(b'"') => break,
                    Some(b'\\') => i += 2,
                    Some(_) => i += 1,
                }
            }
            if memchr::memmem::find(&v[open + 1..i], b"\\\"").is_some() {
                return false;
            }
            i += 1;
        } else {
            let value = i;
            while v.get(i).is_some_and(token) {
                i += 1;
            }
            if i == value {
                return false;
            }
        }
        i = ows(v, i);
        if i < v.len() && v[i] != b';' {
            return false;
        }
    }
    true
}

/// A parameter: its lowercased name, its value, and whether the value had an escape.
pub(crate) type Param = (Vec<u8>, Vec<u8>, bool);

/// A `;`-separated parameter list (`form-data; name="model"`, `text/plain; charset=utf-8`):
/// the leading value, then each parameter's lowercased name, value (quotes removed, backslash
/// escapes decoded) and whether the value had an escape. `None` when a quoted string is not
/// closed or is followed by something other than `;`, or a bare value has a space, a control
/// character, a comma, a quote or a backslash in it.
pub(crate) fn params(v: &[u8]) -> Option<(&[u8], Vec<Param>)> {
    let first = v.iter().position(|&c| c == b';').unwrap_or(v.len());
    let head = v[..first].trim_ascii();
    let mut out = Vec::new();
    let mut i = first;
    while i < v.len() {
        // At a `;`.
        i += 1;
        let end = v[i..]
            .iter()
            .position(|&c| c == b'=' || c == b';')
            .map_or(v.len(), |k| i + k);
        let name = v[i..end].trim_ascii().to_ascii_lowercase();
        if v.get(end) != Some(&b'=') {
            if !name.is_empty() {
                out.push((name, Vec::new(), false));
            }
            i = end;
            continue;
        }
        i = end + 1;
        while matches!(v.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        let mut value = Vec::new();
        let mut escaped = false;
        if v.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match *v.get(i)? {
                    b'"' => break,
                    b'\\' => {
                        escaped = true;
                        value.push(*v.get(i + 1)?);
                        i += 2;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            i += 1;
            while matches!(v.get(i), Some(b' ' | b'\t')) {
                i += 1;
            }
            if i < v.len() && v[i] != b';' {
                return None;
            }
        } else {
            let end = v[i..]
                .iter()
                .position(|&c| c == b';')
                .map_or(v.len(), |k| i + k);
            let bare = v[i..end].trim_ascii();
            // A bare value is a token: parsers that stop at a comma, a space or a quote
            // read `boundary=a, b` as `a`, others as all of it.
            if bare.iter().any(|&c| c <= b' ' || b",\"\\".contains(&c)) {
                return None;
            }
            value.extend_from_slice(bare);
            i = end;
        }
        out.push((name, value, escaped));
    }
    Some((head, out))
}

/// Whether a `charset` parameter value names UTF-8 (or its subset ASCII).
pub(crate) fn utf8_charset(name: &[u8]) -> bool {
    ["utf-8", "utf8", "us-ascii", "ascii"]
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c.as_bytes()))
}

/// Whether a part is the `purpose` field.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    #[default]
    No,
    Yes,
    /// Named so only once unescaped or decoded (`purp\ose`, `name*=`, `%70urpose`).
    LooksLike,
}

/// What one part's headers say.
#[derive(Default)]
struct PartHead {
    name: Option<Name>,
    purpose: Purpose,
    /// What makes a `model` part's value doubtful: it is a file, or has a transfer encoding
    /// or a charset other than UTF-8.
    odd: bool,
}

/// Reads a part's header block: CRLF-terminated lines, without the blank line.
fn part_head(block: &[u8]) -> Result<PartHead, ()> {
    let mut head = PartHead::default();
    let mut dispositions = 0;
    for line in block.split_inclusive(|&c| c == b'\n') {
        // A bare CR or LF, or a folded line, is read differently by different parsers.
        let line = line.strip_suffix(b"\r\n").ok_or(())?;
        if line.contains(&b'\r') || matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(());
        }
        let colon = line.iter().position(|&c| c == b':').ok_or(())?;
        let (field, value) = (line[..colon].trim_ascii(), &line[colon + 1..]);
        // A name with bytes Werkzeug strips and we do not (`Content-Disposition\x0b`) would be
        // a header to it and none to us.
        if field.is_empty() || !field.iter().all(token) {
            return Err(());
        }
        let has_params = field.eq_ignore_ascii_case(b"content-disposition")
            || field.eq_ignore_ascii_case(b"content-type");
        if has_params && !plainly_spelled(value) {
            return Err(());
        }
        if field.eq_ignore_ascii_case(b"content-disposition") {
            dispositions += 1;
            head.name = disposition_name(value)?;
            let (_, ps) = params(value).ok_or(())?;
            for (n, v, escaped) in ps.iter().filter(|(n, _, _)| n.starts_with(b"name")) {
                let loose: Vec<u8> = percent_decode(v, false)
                    .iter()
                    .filter(|&&c| c != b'\\')
                    .map(u8::to_ascii_lowercase)
                    .collect();
                if memchr::memmem::find(&loose, b"purpose").is_some() {
                    head.purpose = match (n.as_slice(), escaped, v.as_slice()) {
                        (b"name", false, b"purpose") if head.purpose == Purpose::No => Purpose::Yes,
                        _ => Purpose::LooksLike,
                    };
                }
            }
            head.odd |= ps
                .iter()
                .any(|(n, _, _)| n == b"filename" || n == b"filename*");
        } else if field.eq_ignore_ascii_case(b"content-transfer-encoding") {
            let v = value.trim_ascii();
            head.odd |= !["7bit", "8bit", "binary"]
                .iter()
                .any(|e| v.eq_ignore_ascii_case(e.as_bytes()));
        } else if field.eq_ignore_ascii_case(b"content-type") {
            let (_, ps) = params(value).ok_or(())?;
            head.odd |= ps
                .iter()
                .any(|(n, v, _)| n == b"charset" && !utf8_charset(v));
        }
    }
    if dispositions > 1 {
        return Err(());
    }
    Ok(head)
}

/// The field name a `Content-Disposition` value gives. `name="model"` is the model; a name
/// that is `model` only with its backslash escapes decoded, or an RFC 5987 `name*=` beside
/// or instead of it where either one is (or looks like) `model`, is read differently by
/// different parsers, and so is a continued `name*0=`. Two `name` or two `name*` are an error.
fn disposition_name(value: &[u8]) -> Result<Option<Name>, ()> {
    let (_, ps) = params(value).ok_or(())?;
    let mut name = None;
    let mut star = None;
    for (n, v, escaped) in &ps {
        match n.as_slice() {
            b"name" if name.is_some() => return Err(()),
            b"name*" if star.is_some() => return Err(()),
            b"name" => {
                name = Some(match name_kind(v) {
                    Name::Model if *escaped => Name::LooksLike,
                    k => k,
                })
            }
            b"name*" => {
                // charset'language'percent-encoded
                let text = v.splitn(3, |&c| c == b'\'').nth(2).unwrap_or(v);
                star = Some(name_kind(&percent_decode(text, false)));
            }
            // RFC 2231 continuations (`name*0="mo"; name*1="del"`): joined by some parsers
            // (Werkzeug, Python's email), ignored by others.
            n if n.starts_with(b"name*") => star = Some(Name::LooksLike),
            _ => {}
        }
    }
    Ok(match (name, star) {
        (n, None) => n,
        (None | Some(Name::Other), Some(Name::Other)) => Some(Name::Other),
        _ => Some(Name::LooksLike),
    })
}

/// The `model` field of a `multipart/form-data` body with this `boundary`: the part named
/// `model`. Strict where parsers differ (bare LF line ends, folded or repeated headers, a
/// boundary string inside a part, a part named with an escape or `name*=`, a `model` part
/// that is a file or transfer-encoded): those are ambiguous. `complete`: `body` is the whole
/// body; else its end is a cut, not an error.
pub fn multipart_model(body: &[u8], boundary: &[u8], complete: bool) -> Field {
    let mut out = Field::default();
    let mut doubt = false;
    let end = each_part(body, boundary, |head, content| match head.name {
        Some(Name::LooksLike) => {
            doubt = true;
            false
        }
        Some(Name::Model) if out.named || head.odd => {
            doubt = true;
            false
        }
        Some(Name::Model) => {
            out.named = true;
            out.model = field_value(content);
            // Named, and not a value we can read (too long, not UTF-8): not "no model".
            out.ambiguous = out.model.is_none();
            true
        }
        _ => true,
    });
    match end {
        _ if doubt => Field::doubtful(),
        Parts::Closed | Parts::Stopped => out,
        // Where the prefix runs out: complete, that is a malformed body; cut, nothing more known.
        Parts::Cut if !complete => out,
        Parts::Cut | Parts::Doubtful => Field::doubtful(),
    }
}

/// The one `purpose` field of a whole `multipart/form-data` body (OpenAI's Files API and its
/// imitators), when it is sure: read as [`multipart_model`] reads `model`, so that a body
/// framed or spelled where parsers differ, a second field that is or may be `purpose`, or a
/// transfer-encoded one, gives `None`.
pub fn multipart_purpose<'b>(body: &'b [u8], boundary: &[u8]) -> Option<&'b [u8]> {
    let mut found = None;
    let mut doubt = false;
    let end = each_part(body, boundary, |head, content| {
        match head.purpose {
            Purpose::No => {}
            Purpose::Yes if found.is_none() && !head.odd => found = Some(content),
            _ => doubt = true,
        }
        !doubt
    });
    match end {
        Parts::Closed if !doubt => found,
        _ => None,
    }
}

/// How a walk over a multipart body's parts ended.
enum Parts {
    /// At the close delimiter: every part was seen.
    Closed,
    /// The visitor asked to stop.
    Stopped,
    /// The prefix ran out first.
    Cut,
    /// Framing or headers where parsers differ.
    Doubtful,
}

/// Calls `visit` with each part's headers and content, in order, while it returns `true`.
fn each_part<'b>(
    body: &'b [u8],
    boundary: &[u8],
    mut visit: impl FnMut(&PartHead, &'b [u8]) -> bool,
) -> Parts {
    if boundary.is_empty() || boundary.len() > 70 || !boundary.iter().all(|&c| bchar(c)) {
        return Parts::Doubtful;
    }
    // The first delimiter: at the start, or after a preamble and CRLF.
    let mut i = if body.starts_with(b"--") && body[2..].starts_with(boundary) {
        0
    } else {
        match next_delimiter(body, 0, boundary) {
            Ok(Some(at)) => at + 2,
            Ok(None) => return Parts::Cut,
            Err(()) => return Parts::Doubtful,
        }
    };
    loop {
        // At `--boundary`.
        i += 2 + boundary.len();
        let rest = &body[i..];
        if rest.starts_with(b"--") {
            // The close delimiter: an epilogue after it is ignored by every parser.
            return Parts::Closed;
        }
        let pad = rest
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        match &rest[pad..] {
            [b'\r', b'\n', ..] => i += pad + 2,
            [] | [b'\r'] | [b'-'] => return Parts::Cut,
            _ => return Parts::Doubtful,
        }
        // The header block, up to the blank line (which may come at once: no headers).
        let (block, content) = if body[i..].starts_with(b"\r\n") {
            (&body[i..i], i + 2)
        } else {
            let Some(k) = body[i..].windows(4).position(|w| w == b"\r\n\r\n") else {
                return Parts::Cut;
            };
            (&body[i..i + k + 2], i + k + 4)
        };
        let Ok(head) = part_head(block) else {
            return Parts::Doubtful;
        };
        let end = match next_delimiter(body, content, boundary) {
            Ok(Some(at)) => at,
            Ok(None) => return Parts::Cut,
            Err(()) => return Parts::Doubtful,
        };
        if !visit(&head, &body[content..end]) {
            return Parts::Stopped;
        }
        i = end + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every parser splits alike passes; what Werkzeug, Go or python-multipart split
    /// otherwise does not (each spelling was a bypass found by the red team).
    #[test]
    fn parameters_spelled_for_every_parser() {
        for ok in [
            &b"multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxk"[..],
            b"multipart/form-data; boundary=\"a b/c\"",
            b" form-data; name=\"file\"; filename=\"report; final.pdf\"",
            b" form-data; name=\"file\"; filename=\"C:\\\\dir\\\\f.pdf\"",
            b" form-data; name=\"purpose\";",
            b"application/json; charset=utf-8",
            b" form-data",
        ] {
            assert!(plainly_spelled(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b" form-data; x=\"a\\\\\"; y=\"; name=purpose; z=\""[..],
            b" form-data; y= \"; name=purpose; z=\"",
            b" form-data; y@=\"; name=purpose; z=\"",
            b" form-data; name=model/x",
            b" form-data; name=model=1",
            b" form-data; name=\xc2\xa0model",
            b" form-data; name=model\xc2\xa0",
            b"multipart/form-data; boundary=AAA/B",
            b" form-data; name=\"mo\\del\"",
            b" form-data;; name=model",
            b" form-data; name",
            b" form-data; name=\"model",
            b" form-data; name = \"model\"",
        ] {
            assert!(!plainly_spelled(bad), "{}", String::from_utf8_lossy(bad));
        }
        // A header name Werkzeug strips and we would not.
        assert!(part_head(b"Content-Disposition\x0b: form-data; name=\"model\"\r\n").is_err());
        assert!(part_head(b"\x1cContent-Disposition: form-data; name=\"model\"\r\n").is_err());
        assert!(part_head(b"Content-Disposition : form-data; name=\"model\"\r\n").is_ok());
    }

    fn m(body: &str) -> Option<String> {
        model(body.as_bytes()).map(Cow::into_owned)
    }

    fn is_borrowed(body: &[u8]) -> bool {
        matches!(model(body), Some(Cow::Borrowed(_)))
    }

    #[test]
    fn openai_chat_body() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"Hi"}],"temperature":0.7,"stream":true}"#;
        assert_eq!(m(body).as_deref(), Some("gpt-4o-mini"));
        assert!(is_borrowed(body.as_bytes()));
    }

    #[test]
    fn anthropic_messages_body() {
        let body = r#"{
  "max_tokens": 1024,
  "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
  "messages": [{"role": "user", "content": [{"type": "text", "text": "what model are you? \"model\": \"evil\""}]}],
  "model": "claude-sonnet-4-5",
  "metadata": {"user_id": "u-1"}
}"#;
        assert_eq!(m(body).as_deref(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn model_after_large_messages_array() {
        let mut body = String::from(r#"{"messages":["#);
        for i in 0..5000 {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"role":"user","content":"turn {i} mentions \"model\":\"x\" and {{[braces]}}","model":"nested-{i}"}}"#
            ));
        }
        body.push_str(r#"],"model":"gpt-4.1"}"#);
        assert!(body.len() > 300_000);
        assert_eq!(m(&body).as_deref(), Some("gpt-4.1"));
    }

    /// A `model` named with a value the scanner cannot read is not a body without a model:
    /// `gpt-4o-` and 300 more bytes would pass a `gpt-4o*` block as "no model".
    #[test]
    fn a_model_value_too_long_or_unreadable_is_ambiguous_not_absent() {
        let long = format!(r#"{{"model":"gpt-4o-{}"}}"#, "x".repeat(300));
        assert_eq!(m(&long), None);
        assert!(model_ambiguous(long.as_bytes()));
        let at_cap = format!(r#"{{"model":"{}"}}"#, "x".repeat(MAX_VALUE));
        assert!(m(&at_cap).is_some());
        assert!(!model_ambiguous(at_cap.as_bytes()));
        // Cut off by the end of the prefix: unknown, which `partial` answers for, not wrong.
        assert!(!model_ambiguous(br#"{"model":"gpt-4o"#));

        let form = format!("model=gpt-4o-{}&x=1", "x".repeat(300));
        let f = form_model(form.as_bytes(), true);
        assert_eq!(
            (f.named, f.model.as_deref(), f.ambiguous),
            (true, None, true)
        );
        let f = form_model(b"model=gpt-4o%FF", true);
        assert_eq!((f.named, f.ambiguous), (true, true));
        let f = form_model(b"model=gpt-4o", true);
        assert_eq!((f.model.as_deref(), f.ambiguous), (Some("gpt-4o"), false));
        let multipart = format!(
            "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-{}\r\n--b--\r\n",
            "x".repeat(300)
        );
        let f = multipart_model(multipart.as_bytes(), b"b", true);
        assert_eq!((f.named, f.ambiguous), (true, true));
    }

    #[test]
    fn nested_model_keys_ignored() {
        for body in [
            r#"{"metadata":{"model":"inner"},"model":"outer"}"#,
            r#"{"tools":[{"name":"x","model":"inner"}],"model":"outer"}"#,
            r#"{"prompt":"\"model\": \"inner\"","model":"outer"}"#,
            r#"{"a":[[["model"]]],"b":{"c":{"model":{"model":"inner"}}},"model":"outer"}"#,
            r#"{"model_name":"inner","Model":"inner","model ":"inner","model":"outer"}"#,
        ] {
            assert_eq!(m(body).as_deref(), Some("outer"), "{body}");
        }
        assert_eq!(m(r#"{"metadata":{"model":"inner"}}"#), None);
        assert_eq!(m(r#"{"messages":[{"model":"inner"}]}"#), None);
    }

    #[test]
    fn key_spelled_with_escapes() {
        assert_eq!(m(r#"{"mod\u0065l":"gpt-4o"}"#).as_deref(), Some("gpt-4o"));
        assert_eq!(
            m(r#"{"\u006D\u006f\u0064\u0065\u006C":"gpt-4o"}"#).as_deref(),
            Some("gpt-4o")
        );
        // Decodes to something else: not the model key.
        assert_eq!(
            m(r#"{"mod\u0065l\u0000":"x","model":"y"}"#).as_deref(),
            Some("y")
        );
        assert_eq!(m(r#"{"mo\/del":"x","model":"y"}"#).as_deref(), Some("y"));
        // Invalid escape before the key: malformed, no guess.
        assert_eq!(m(r#"{"mod\el":"x","model":"y"}"#), None);
    }

    #[test]
    fn value_with_escapes() {
        let got = model(br#"{"model":"gpt\u002d4o\/mini"}"#);
        assert!(matches!(got, Some(Cow::Owned(ref s)) if s == "gpt-4o/mini"));
        assert_eq!(m(r#"{"model":"a\"b\\c\n"}"#).as_deref(), Some("a\"b\\c\n"));
        assert_eq!(
            m(r#"{"model":"\u00e9\ud83d\ude00x"}"#).as_deref(),
            Some("é😀x")
        );
        assert_eq!(m(r#"{"model":"é😀"}"#).as_deref(), Some("é😀"));
        // Lone surrogates: Python's and JavaScript's parsers accept them, so
        // the value is read (as U+FFFD, which Rust strings can hold) rather
        // than refused, as it once was.
        assert_eq!(m(r#"{"model":"\ud83d"}"#).as_deref(), Some("\u{FFFD}"));
        assert_eq!(m(r#"{"model":"\ud83dx"}"#).as_deref(), Some("\u{FFFD}x"));
        assert_eq!(m(r#"{"model":"\ude00"}"#).as_deref(), Some("\u{FFFD}"));
        assert_eq!(
            m(r#"{"model":"\ud83d\u0041"}"#).as_deref(),
            Some("\u{FFFD}A")
        );
        assert_eq!(m(r#"{"model":"\u12g4"}"#), None);
        assert_eq!(m(r#"{"model":"\x"}"#), None);
        assert_eq!(m("{\"model\":\"a\tb\"}"), None); // raw control char
    }

    #[test]
    fn truncated_prefixes() {
        let full =
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o","stream":true}"#;
        let end = full.find("gpt-4o").unwrap() + "gpt-4o\"".len();
        for cut in 0..=full.len() {
            assert!(!model_ambiguous(&full.as_bytes()[..cut]), "cut {cut}");
            let got = model(&full.as_bytes()[..cut]);
            if cut >= end {
                assert_eq!(got.as_deref(), Some("gpt-4o"), "cut {cut}");
            } else {
                assert_eq!(got, None, "cut {cut}");
            }
        }
    }

    #[test]
    fn non_objects_and_non_strings() {
        for body in [
            "",
            "   ",
            r#"["model","gpt-4o"]"#,
            r#""model""#,
            "null",
            "model=gpt-4o&x=1",
            r#"{"model":4}"#,
            r#"{"model":null}"#,
            r#"{"model":["gpt-4o"]}"#,
            r#"{"model":{"name":"gpt-4o"}}"#,
            r#"{"model" "gpt-4o"}"#,
            r#"{model:"gpt-4o"}"#,
            r#"{'model':'gpt-4o'}"#,
            r#"{"a":1,,"model":"gpt-4o"}"#,
            r#"{"a":1 "model":"gpt-4o"}"#,
            r#"{"a":,"model":"gpt-4o"}"#,
            r#"{"a":1,}"#,
            r#"{}"#,
            r#"{"a":]"model":"x"}"#,
        ] {
            assert_eq!(m(body), None, "{body}");
        }
        // First wins even when it is not a string: the vendor would reject
        // or mis-typecheck it, and we must not fall through to a later one.
        assert_eq!(m(r#"{"model":1,"model":"gpt-4o"}"#), None);
        assert_eq!(
            m(r#"{"model":"first","model":"second"}"#).as_deref(),
            Some("first")
        );
    }

    #[test]
    fn duplicate_top_level_model_keys_are_reported() {
        for body in [
            r#"{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}"#,
            r#"{"model":"a","mod\u0065l":"b"}"#,
            r#"{ "x": {"model":"n"}, "model": "a", "y": [1, "s"], "model": 1 }"#,
            // Go's encoding/json matches keys regardless of case, and takes the last.
            r#"{"Model":"gpt-4o"}"#,
            r#"{"MODEL":"gpt-4o"}"#,
            r#"{"model":"gpt-3.5-turbo","mOdEl":"gpt-4o"}"#,
            r#"{"\u004dodel":"gpt-4o"}"#,
        ] {
            assert!(model_ambiguous(body.as_bytes()), "{body}");
        }
        for body in [
            r#"{"model":"gpt-4o"}"#,
            "{\"model\":\"gpt-4o\"}\r\n \t",
            r#"{"model":"gpt-4o","messages":[{"Model":"x"}]}"#,
            r#"{"modelx":"a","xmodel":"b","Models":"c"}"#,
            r#"{"model":"gpt-4o","messages":[{"model":"x"}]}"#,
            r#"{"model":"gpt-4o","meta":{"model":"x","model":"y"}}"#,
            r#"{"models":"a","model":"b"}"#,
            r#"{"model":"a","messages":[1,2"#,
            r#"[{"model":"a"},{"model":"b"}]"#,
        ] {
            assert!(!model_ambiguous(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn lone_surrogate_keys_do_not_hide_later_members() {
        // Python's json.loads and JavaScript's JSON.parse accept all of these
        // and read the last "model".
        for key in [
            r"\ud800",
            r"\udfff",
            r"\uDBFF",
            r"\ud800\ud800",
            r"\udc00\ud800",
            r"x\ud83dy",
            r"\ud83d\u0041",
            r"mod\ud800el",
        ] {
            let body = format!(r#"{{"{key}":0,"model":"gpt-4o"}}"#);
            assert_eq!(m(&body).as_deref(), Some("gpt-4o"), "{body}");
            assert!(!model_ambiguous(body.as_bytes()), "{body}");
            let twice = format!(r#"{{"model":"gpt-4o-mini","{key}":0,"model":"gpt-4o"}}"#);
            assert!(model_ambiguous(twice.as_bytes()), "{twice}");
        }
        // A key holding a lone surrogate is never `model` itself.
        for body in [
            r#"{"model\ud800":"x","model":"y"}"#,
            r#"{"\ud800model":"x","model":"y"}"#,
        ] {
            assert_eq!(m(body).as_deref(), Some("y"), "{body}");
        }
        // A pair still decodes to one character.
        assert_eq!(m(r#"{"\ud83d\ude00":0,"model":"y"}"#).as_deref(), Some("y"));
    }

    #[test]
    fn malformed_objects_are_ambiguous() {
        // Vendors reject these, or read them some other way: the first
        // value, or none, is a guess either way.
        for body in [
            r#"{"a":1,,"model":"gpt-4o"}"#,
            r#"{"a":1 "model":"gpt-4o"}"#,
            r#"{"a":,"model":"gpt-4o"}"#,
            r#"{"a":1,}"#,
            r#"{"a":]"model":"x"}"#,
            r#"{"mod\el":"x","model":"y"}"#,
            r#"{"model":"gpt-4o-mini","\x":0,"model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o-mini","a":1 "model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o-mini" "model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o-mini","a":{"b":1}],"model":"gpt-4o"}"#,
            r#"{"model":"gpt\x4o"}"#,
            r#"{"model":"gpt\u004"}"#,
            "{\"model\":\"gpt\t4o\"}",
            "{\"a\tb\":0,\"model\":\"x\"}",
            r#"{"model" "gpt-4o"}"#,
            r#"{model:"gpt-4o"}"#,
            r#"{'model':'gpt-4o'}"#,
            r#"{"model":,"x":1}"#,
        ] {
            assert!(model_ambiguous(body.as_bytes()), "{body}");
        }
        // Not objects (form or multipart bodies), or well formed: nothing
        // to refuse, whatever `model` answers.
        for body in [
            "",
            "model=gpt-4o&x=1",
            "--boundary\r\nContent-Disposition: form-data; name=\"model\"",
            r#"["model","gpt-4o"]"#,
            r#""model""#,
            "null",
            r#"{}"#,
            r#"{"model":4}"#,
            r#"{"model":null,"a":[]}"#,
            r#"{"model":{"name":"gpt-4o"}}"#,
            // What follows the object is not read: strict parsers refuse the body, and
            // lenient ones (Go's json.Decoder) read the first object, as this does.
            r#"{"model":"gpt-4o"}{"model":"x"}"#,
        ] {
            assert!(!model_ambiguous(body.as_bytes()), "{body}");
        }
        // Too long to read is not "no model": see
        // `a_model_value_too_long_or_unreadable_is_ambiguous_not_absent`.
        let long = format!(r#"{{"model":"{}","a":1}}"#, "a".repeat(MAX_VALUE + 1));
        assert!(model_ambiguous(long.as_bytes()));
    }

    #[test]
    fn truncation_is_not_malformed() {
        // Cut anywhere, inside escapes and surrogate pairs included, a
        // well-formed body is never taken for a malformed one: a prefix cap
        // must not refuse honest large requests.
        for full in [
            r#"{"\ud800":0,"\ud83d\ude00":"\u00e9\/\"","model":"gpt\ud83d\ude00\ud800","b":[{"c":"\\"}],"model":"x"}"#,
            r#"{"mod\u0065l":"gpt-4o","messages":[{"content":"\udbff\udfff ok"}]}"#,
        ] {
            let b = full.as_bytes();
            assert!(
                model_ambiguous(b) == full.ends_with(r#""model":"x"}"#),
                "{full}"
            );
            let second = full.rfind(r#","model":"x""#).unwrap_or(full.len());
            for cut in 0..second {
                assert!(!model_ambiguous(&b[..cut]), "cut {cut}: {full}");
            }
        }
        assert_eq!(
            m(r#"{"\ud800":0,"\ud83d\ude00":"\u00e9\/\"","model":"gpt\ud83d\ude00\ud800"}"#)
                .as_deref(),
            Some("gpt😀\u{FFFD}")
        );
    }

    #[test]
    fn invalid_utf8_value() {
        assert_eq!(model(b"{\"model\":\"gpt\xff\"}"), None);
        assert_eq!(model(b"{\"model\":\"\\u0041\xc3\"}"), None);
        // Invalid UTF-8 elsewhere does not matter.
        assert_eq!(
            model(b"{\"x\":\"\xff\xfe\",\"model\":\"ok\"}").as_deref(),
            Some("ok")
        );
    }

    #[test]
    fn value_length_cap() {
        let ok = "a".repeat(MAX_VALUE);
        assert_eq!(m(&format!(r#"{{"model":"{ok}"}}"#)), Some(ok.clone()));
        let long = "a".repeat(MAX_VALUE + 1);
        assert_eq!(m(&format!(r#"{{"model":"{long}"}}"#)), None);
        // The cap is on decoded bytes: 256 escaped chars are fine, 257 not.
        let esc = r"\u0061".repeat(MAX_VALUE);
        assert_eq!(m(&format!(r#"{{"model":"{esc}"}}"#)), Some(ok));
        let esc = r"\u0061".repeat(MAX_VALUE + 1);
        assert_eq!(m(&format!(r#"{{"model":"{esc}"}}"#)), None);
        // A huge value is rejected without scanning to its end.
        let huge = format!(r#"{{"model":"{}"#, "b".repeat(10 << 20));
        assert_eq!(m(&huge), None);
    }

    #[test]
    fn whitespace_variants_and_bom() {
        for body in [
            " \t\r\n{ \t\r\n\"model\" \t\r\n: \t\r\n\"gpt-4o\" \t\r\n}",
            "{\"a\" : [ 1 , 2 ] ,\n\"model\"\n:\n\"gpt-4o\"}",
            "\u{FEFF}{\"model\":\"gpt-4o\"}",
            "\u{FEFF} \n{\"model\":\"gpt-4o\"}",
        ] {
            assert_eq!(m(body).as_deref(), Some("gpt-4o"), "{body:?}");
        }
        // Not JSON whitespace.
        for body in [
            "\u{A0}{\"model\":\"gpt-4o\"}",
            "{\u{c}\"model\":\"gpt-4o\"}",
            "{\"model\":\u{A0}\"gpt-4o\"}",
            " \u{FEFF}{\"model\":\"gpt-4o\"}",
        ] {
            assert_eq!(m(body), None, "{body:?}");
        }
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let depth = 1_000_000;
        let body = format!(
            r#"{{"a":{}{},"model":"deep-ok"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(m(&body).as_deref(), Some("deep-ok"));
        let unbalanced = format!(r#"{{"a":{},"model":"x"}}"#, "[".repeat(depth));
        assert_eq!(m(&unbalanced), None);
    }

    /// Deterministic xorshift64*: no extra crates, reproducible failures.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// (JSON-encoded, decoded) string fragments, chosen to stress the
    /// scanner: quotes, backslashes, brackets and the word "model" inside
    /// strings, and every escape form.
    const PIECES: &[(&str, &str)] = &[
        ("gpt-4o", "gpt-4o"),
        ("model", "model"),
        ("claude", "claude"),
        (r#"\""#, "\""),
        (r"\\", "\\"),
        (r"\/", "/"),
        (r"\n", "\n"),
        (r"\t\r\b\f", "\t\r\u{8}\u{c}"),
        (r"\u00e9", "é"),
        (r"\u00E9", "é"),
        ("é", "é"),
        ("😀", "😀"),
        (r"\ud83d\ude00", "😀"),
        (r"\u0041", "A"),
        ("{", "{"),
        ("}", "}"),
        ("[", "["),
        ("]", "]"),
        (":", ":"),
        (",", ","),
        (" ", " "),
        (r#"\"model\":\"x\""#, r#""model":"x""#),
    ];

    const WS: &[&str] = &["", "", "", " ", "\t", "\n", "\r\n", "  \n  "];

    fn ws(r: &mut Rng, out: &mut String) {
        out.push_str(WS[r.below(WS.len())]);
    }

    /// Appends a random JSON string and returns its decoded value.
    fn gen_string(r: &mut Rng, max_pieces: usize, out: &mut String) -> String {
        let mut decoded = String::new();
        out.push('"');
        for _ in 0..r.below(max_pieces + 1) {
            let (enc, dec) = PIECES[r.below(PIECES.len())];
            out.push_str(enc);
            decoded.push_str(dec);
        }
        out.push('"');
        decoded
    }

    fn gen_value(r: &mut Rng, depth: usize, out: &mut String) {
        let kinds = if depth >= 5 { 3 } else { 5 };
        match r.below(kinds) {
            0 => {
                gen_string(r, 6, out);
            }
            1 => out.push_str(["0", "-12.5e3", "42", "1E-7", "3.25"][r.below(5)]),
            2 => out.push_str(["true", "false", "null"][r.below(3)]),
            3 => {
                out.push('{');
                ws(r, out);
                for k in 0..r.below(5) {
                    if k > 0 {
                        out.push(',');
                        ws(r, out);
                    }
                    // Nested keys may well be "model"; they must be ignored.
                    gen_string(r, 3, out);
                    ws(r, out);
                    out.push(':');
                    ws(r, out);
                    gen_value(r, depth + 1, out);
                    ws(r, out);
                }
                out.push('}');
            }
            _ => {
                out.push('[');
                ws(r, out);
                for k in 0..r.below(5) {
                    if k > 0 {
                        out.push(',');
                        ws(r, out);
                    }
                    gen_value(r, depth + 1, out);
                    ws(r, out);
                }
                out.push(']');
            }
        }
    }

    /// A top-level object with random members and one `"model"` member at a
    /// random position. Returns the body, the decoded model, and the index
    /// just past the model value (the shortest prefix that must succeed).
    fn gen_body(r: &mut Rng) -> (String, String, usize) {
        let mut out = String::new();
        if r.below(8) == 0 {
            out.push('\u{FEFF}');
        }
        ws(r, &mut out);
        out.push('{');
        ws(r, &mut out);
        let members = r.below(6);
        let at = r.below(members + 1);
        let mut expected = None;
        for k in 0..=members {
            if k > 0 {
                out.push(',');
                ws(r, &mut out);
            }
            if k == at {
                let key = [r#""model""#, r#""mod\u0065l""#, r#""\u006dodel""#][r.below(3)];
                out.push_str(key);
                ws(r, &mut out);
                out.push(':');
                ws(r, &mut out);
                let v = gen_string(r, 8, &mut out);
                expected = Some((v, out.len()));
            } else {
                loop {
                    let mut key = String::new();
                    if gen_string(r, 3, &mut key) != "model" {
                        out.push_str(&key);
                        break;
                    }
                }
                ws(r, &mut out);
                out.push(':');
                ws(r, &mut out);
                gen_value(r, 1, &mut out);
            }
            ws(r, &mut out);
        }
        out.push('}');
        ws(r, &mut out);
        let (v, end) = expected.expect("model member always inserted");
        (out, v, end)
    }

    #[test]
    fn random_bodies_agree_with_serde_json() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..3000 {
            let (body, want, end) = gen_body(&mut r);
            let json = body.strip_prefix('\u{FEFF}').unwrap_or(&body);
            let parsed: serde_json::Value =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("case {case}: {e}: {body}"));
            assert_eq!(
                parsed["model"].as_str(),
                Some(want.as_str()),
                "generator, case {case}"
            );
            assert_eq!(
                m(&body).as_deref(),
                Some(want.as_str()),
                "case {case}: {body}"
            );
            assert!(!model_ambiguous(body.as_bytes()), "case {case}: {body}");
            for _ in 0..8 {
                let cut = r.below(body.len() + 1);
                assert!(
                    !model_ambiguous(&body.as_bytes()[..cut]),
                    "case {case} cut {cut}: {body}"
                );
                let got = model(&body.as_bytes()[..cut]);
                if cut >= end {
                    assert_eq!(
                        got.as_deref(),
                        Some(want.as_str()),
                        "case {case} cut {cut}: {body}"
                    );
                } else {
                    assert_eq!(got, None, "case {case} cut {cut}: {body}");
                }
            }
        }
    }

    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_model_64k() {
        let mut body = String::from(r#"{"messages":["#);
        while body.len() < 64 * 1024 {
            body.push_str(
                r#"{"role":"user","content":"some text with \"quotes\" and {braces} here"},"#,
            );
        }
        body.push_str(r#"{"role":"user","content":"end"}],"model":"gpt-4o"}"#);
        for (label, b) in [
            (
                "model first",
                r#"{"model":"gpt-4o","messages":[]}"#.as_bytes(),
            ),
            ("model after 64 KiB", body.as_bytes()),
        ] {
            let iters = 2000;
            let t = std::time::Instant::now();
            for _ in 0..iters {
                assert!(std::hint::black_box(model(std::hint::black_box(b))).is_some());
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
            println!(
                "model(), {label}: {} bytes, {ns:.0} ns/call, {:.3} ns/byte",
                b.len(),
                ns / b.len() as f64
            );
        }
    }

    fn form(body: &str) -> Field {
        form_model(body.as_bytes(), true)
    }

    fn one(m: &str) -> Field {
        Field {
            named: true,
            model: Some(m.into()),
            ambiguous: false,
        }
    }

    #[test]
    fn form_model_reads_the_field_as_form_parsers_do() {
        assert_eq!(form("model=gpt-4o"), one("gpt-4o"));
        assert_eq!(form("prompt=a+b&model=gpt-4o&n=1"), one("gpt-4o"));
        assert_eq!(form("mod%65l=gpt%2D4o"), one("gpt-4o"));
        assert_eq!(form("x=1;model=gpt-4o"), one("gpt-4o"));
        assert_eq!(form("model=a+b%20c"), one("a b c"));
        assert_eq!(form("model=%zz"), one("%zz"));
        assert_eq!(form("&&model=x&&"), one("x"));
        for body in [
            "",
            "x=1",
            "models=a",
            "a=model",
            "x=model%3Dgpt-4o",
            "model_=1",
        ] {
            assert_eq!(form(body), Field::default(), "{body}");
        }
        // There, but not readable as a model: named, no value, and not to be taken for a body
        // that names none.
        let long = format!("model={}", "a".repeat(MAX_VALUE + 1));
        for body in [long.as_str(), "model=%ff"] {
            let f = form(body);
            assert!(f.named && f.model.is_none() && f.ambiguous, "{body}");
        }
        // A name without `=` has the empty value.
        assert_eq!(form("model"), one(""));
    }

    #[test]
    fn form_model_doubts_repeats_and_other_spellings() {
        for body in [
            "model=gpt-4o-mini&model=gpt-4o",
            "model=gpt-4o-mini;model=gpt-4o",
            "model=gpt-4o-mini&mod%65l=gpt-4o",
            "model&model=gpt-4o",
            "model=gpt-4o-mini&Model=gpt-4o",
            "MODEL=gpt-4o",
            "mod%2565l=gpt-4o",
            "model=gpt-4o;model=gpt-4o",
            "model=%ff&model=%ff",
        ] {
            assert!(form(body).ambiguous, "{body}");
        }
        // The same value twice is read alike by every parser.
        assert_eq!(form("model=gpt-4o&x=1&mod%65l=gpt%2D4o"), one("gpt-4o"));
    }

    #[test]
    fn form_model_does_not_read_a_pair_a_cut_may_have_shortened() {
        assert_eq!(form_model(b"model=gpt-4", false), Field::default());
        assert_eq!(form_model(b"model=gpt-4o&x=1", false), one("gpt-4o"));
        // A repeat cut short is still a repeat once a later pair shows it whole.
        assert!(form_model(b"model=a&model=b&x", false).ambiguous);
    }

    const B: &[u8] = b"xYz-123";

    /// A multipart body: (headers, value) parts, CRLF line ends, closed.
    fn mp(parts: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (head, value) in parts {
            b.extend_from_slice(b"--xYz-123\r\n");
            b.extend_from_slice(head.as_bytes());
            b.extend_from_slice(b"\r\n\r\n");
            b.extend_from_slice(value.as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--xYz-123--\r\n");
        b
    }

    const MODEL_PART: &str = "Content-Disposition: form-data; name=\"model\"";

    #[test]
    fn multipart_model_reads_the_part_named_model() {
        let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav";
        for body in [
            mp(&[(MODEL_PART, "whisper-1")]),
            mp(&[(file, "RIFF\0\0\r\n--xYz"), (MODEL_PART, "whisper-1")]),
            mp(&[
                ("Content-Disposition: form-data; name=model", "whisper-1"),
                ("Content-Disposition: form-data; name=\"language\"", "model"),
            ]),
            mp(&[("content-disposition:form-data;NAME=\"model\"\r\nContent-Type: text/plain; charset=utf-8", "whisper-1")]),
            [b"preamble\r\n".to_vec(), mp(&[(MODEL_PART, "whisper-1")])].concat(),
            [mp(&[(MODEL_PART, "whisper-1")]), b"epilogue --xYz-123 junk".to_vec()].concat(),
            // Transport padding after a delimiter.
            b"--xYz-123 \t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--xYz-123--"
                .to_vec(),
        ] {
            assert_eq!(
                multipart_model(&body, B, true),
                one("whisper-1"),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        let none = mp(&[("Content-Disposition: form-data; name=\"file\"", "x")]);
        assert_eq!(multipart_model(&none, B, true), Field::default());
        assert_eq!(
            multipart_model(b"--xYz-123--\r\n", B, true),
            Field::default()
        );
    }

    #[test]
    fn multipart_model_doubts_what_parsers_read_differently() {
        for body in [
            mp(&[(MODEL_PART, "a"), (MODEL_PART, "b")]),
            mp(&[(MODEL_PART, "a"), ("Content-Disposition: form-data; name=\"Model\"", "b")]),
            mp(&[("Content-Disposition: form-data; name=\"mod\\el\"", "b")]),
            mp(&[("Content-Disposition: form-data; name=\"mod%65l\"", "b")]),
            mp(&[("Content-Disposition: form-data; name=\"x\"; name*=utf-8''model", "b")]),
            mp(&[("Content-Disposition: form-data; name*=UTF-8''mod%65l", "b")]),
            mp(&[("Content-Disposition: form-data; name=\"model\"; name*=utf-8''x", "b")]),
            mp(&[("Content-Disposition: form-data; name=\"model\"; name=\"x\"", "b")]),
            mp(&[("Content-Disposition: form-data; name*=utf-8''model; name*=utf-8''x", "b")]),
            mp(&[("Content-Disposition: form-data; name*0=\"mo\"; name*1=\"del\"", "b")]),
            mp(&[("Content-Disposition: form-data; name=\"x\"; name*0*=utf-8''model", "b")]),
            mp(&[("Content-Disposition: form-data; name=model, x", "b")]),
            mp(&[(&format!("{MODEL_PART}; filename=\"m.txt\""), "b")]),
            mp(&[(&format!("{MODEL_PART}\r\nContent-Transfer-Encoding: base64"), "Yg==")]),
            mp(&[(&format!("{MODEL_PART}\r\nContent-Type: text/plain; charset=utf-16"), "b")]),
            mp(&[(&format!("{MODEL_PART}\r\n{MODEL_PART}"), "b")]),
            mp(&[(&format!("{MODEL_PART}\r\n folded"), "b")]),
            mp(&[("Content-Disposition: form-data; name=\"model", "b")]),
            mp(&[("no colon", "b")]),
            // The boundary inside a part, followed by something else.
            mp(&[(MODEL_PART, "a\r\n--xYz-123x\r\nmore")]),
            // A delimiter after a bare LF, inside a part: Werkzeug ends the part there.
            mp(&[
                (
                    "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"",
                    "RIFF\n--xYz-123\nContent-Disposition: form-data; name=\"model\"\n\ngpt-4o\n--xYz-123--",
                ),
                (MODEL_PART, "whisper-1"),
            ]),
            // After a bare CR, and mid-line in the preamble: Werkzeug reads a part there.
            mp(&[
                (
                    "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"",
                    "RIFF\r--xYz-123\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o",
                ),
                (MODEL_PART, "whisper-1"),
            ]),
            [&b"x--xYz-123\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n"[..], &mp(&[(MODEL_PART, "whisper-1")])].concat(),
            [&b"x\r--xYz-123\r\n\r\n"[..], &mp(&[(MODEL_PART, "whisper-1")])].concat(),
            // The boundary inside a part's text, mid-line.
            mp(&[(MODEL_PART, "a --xYz-123 b")]),
            // Bare LF line ends.
            b"--xYz-123\nContent-Disposition: form-data; name=\"model\"\n\nb\n--xYz-123--\n".to_vec(),
            b"--xYz-123\r\nContent-Disposition: form-data; name=\"model\"\nX: y\r\n\r\nb\r\n--xYz-123--".to_vec(),
            // Junk after a delimiter.
            b"--xYz-123junk\r\n\r\nb\r\n--xYz-123--".to_vec(),
            // Complete but never closed, or no delimiter at all.
            b"--xYz-123\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb".to_vec(),
            b"model=gpt-4o".to_vec(),
        ] {
            let f = multipart_model(&body, B, true);
            assert!(f.ambiguous, "{}", String::from_utf8_lossy(&body));
        }
        for boundary in [&b""[..], b"a\"b", &[b'a'; 71]] {
            assert!(multipart_model(&mp(&[]), boundary, true).ambiguous);
        }
    }

    #[test]
    fn multipart_model_truncation_is_not_malformed() {
        let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a.bin\"";
        let body = mp(&[
            (
                "Content-Disposition: form-data; name=\"prompt\"",
                "hello\r\n-- there",
            ),
            (MODEL_PART, "gpt-4o-transcribe"),
            (file, "\0\x01\r\n--xYz-12\r\n"),
        ]);
        let value_end = body
            .windows(b"gpt-4o-transcribe\r\n--xYz-123".len())
            .position(|w| w == b"gpt-4o-transcribe\r\n--xYz-123")
            .expect("value")
            + b"gpt-4o-transcribe\r\n--xYz-123".len();
        for cut in 0..body.len() {
            let f = multipart_model(&body[..cut], B, false);
            assert!(!f.ambiguous, "cut {cut}");
            let want = (cut >= value_end).then(|| "gpt-4o-transcribe".to_owned());
            assert_eq!(f.model, want, "cut {cut}");
        }
        assert_eq!(multipart_model(&body, B, true), one("gpt-4o-transcribe"));
    }

    #[test]
    fn params_unquote_and_refuse_open_quotes() {
        let (head, ps) =
            params(b" form-data ; name=\"a\\\"b\" ;filename=x.txt; flag").expect("params");
        assert_eq!(head, b"form-data");
        assert_eq!(
            ps,
            vec![
                (b"name".to_vec(), b"a\"b".to_vec(), true),
                (b"filename".to_vec(), b"x.txt".to_vec(), false),
                (b"flag".to_vec(), Vec::new(), false),
            ]
        );
        assert!(params(b"form-data; name=\"open").is_none());
        assert!(params(b"form-data; name=\"a\"b").is_none());
        for bare in ["a, b", "a b", "a\"b", "a\\b", "a\tb"] {
            let v = format!("form-data; name={bare}; x=1");
            assert!(params(v.as_bytes()).is_none(), "{bare}");
        }
    }
}
