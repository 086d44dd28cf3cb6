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
        if m.is_model {
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
            Ok(m) if m.is_model => {
                if seen || bad_string(body, m.value) {
                    return true;
                }
                seen = true;
            }
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

/// One top-level member.
struct Member {
    /// Its key decodes to `model`.
    is_model: bool,
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
        let (is_model, after_key) = key(b, self.i + 1)?;
        let i = skip_ws(b, after_key);
        expect(b, i, b':')?;
        self.i = skip_ws(b, i + 1);
        Ok(Member {
            is_model,
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

/// Whether the key string starting at `i` (just past its quote) decodes to
/// `model`, and the index past its closing quote.
fn key(b: &[u8], i: usize) -> Result<(bool, usize), Stop> {
    let mut buf = [0u8; 5];
    match decode(b, i, &mut buf) {
        Ok(d) => Ok((&buf[..d.len] == b"model", d.end)),
        Err(DecodeError::Overflow) => Ok((false, string_end(b, i).ok_or(Stop::Truncated)?)),
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

/// Whether the value at `i` is a string with a bad escape or raw control
/// character in the part [`value`] reads: [`model`] then answers `None`,
/// which must not pass for "no model named".
fn bad_string(b: &[u8], i: usize) -> bool {
    b.get(i) == Some(&b'"')
        && matches!(
            decode(b, i + 1, &mut [0u8; MAX_VALUE]),
            Err(DecodeError::Invalid)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            assert!(model_ambiguous(body.as_bytes()), "{body}");
        }
        for body in [
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
            r#"{"model":"gpt-4o"}{"model":"x"}"#,
        ] {
            assert!(!model_ambiguous(body.as_bytes()), "{body}");
        }
        let long = format!(r#"{{"model":"{}","a":1}}"#, "a".repeat(MAX_VALUE + 1));
        assert!(!model_ambiguous(long.as_bytes()));
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
}
